"""The Triton SDDMM kernel (GSPF's dv) against the torch reference: on the CPU through Triton's
interpreter (what CI runs), and on a real GPU where one is present."""

# Shapes chosen to cross every boundary: partial entry blocks, token splits, token chunks.
CHECK = r"""
import torch
from tkllm_ray.sparse.delta_op import sampled_grad_reference
from tkllm_ray.sparse.sddmm_triton import sampled_grad_triton, transpose
dev = "{device}"
g = torch.Generator().manual_seed(0)
for shape in [(5, 3), (130, 67)]:
    a = torch.randn(*shape, generator=g).to(dev, torch.bfloat16)
    assert torch.equal(transpose(a, block=32), a.t())
    assert torch.equal(transpose(a[::2], block=32), a[::2].t())
for tokens, din, dout, k, dtype in [(37, 24, 16, 50, torch.float32), (300, 40, 33, 77, torch.bfloat16)]:
    x = torch.randn(tokens, din, generator=g).to(dev, dtype)
    dy = torch.randn(tokens, dout, generator=g).to(dev, dtype)
    idx = torch.sort(torch.randperm(din * dout, generator=g)[:k]).values.to(dev)
    rows, cols = (idx // din).to(torch.int32), (idx % din).to(torch.int32)
    ref = sampled_grad_reference(dy, x, rows.long(), cols.long())
    got = sampled_grad_triton(dy, x, rows, cols, block_e=16, block_t=16, tok_per_prog=32, tokens_per_chunk=128)
    assert got.dtype == torch.float32 and got.shape == (k,)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_kernel_matches_reference(kernel_check):
    kernel_check(CHECK)
