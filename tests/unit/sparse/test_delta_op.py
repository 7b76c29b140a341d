"""The sparse-delta linear op against dense math: forward, dx, and dv at the selected entries."""

import pytest
import torch

from tkllm_ray.sparse import delta_op
from tkllm_ray.sparse.delta_op import sparse_delta_linear, split_indices


def _case(seed=0, n=7, din=12, dout=9, k=20, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, din, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(dout, din, generator=g, dtype=dtype)
    b = torch.randn(dout, generator=g, dtype=dtype)
    idx = torch.sort(torch.randperm(dout * din, generator=g)[:k]).values
    v = torch.randn(k, generator=g, dtype=dtype, requires_grad=True)
    return x, w, b, idx, v


@pytest.mark.parametrize("merged", [True, False])
def test_forward_and_backward_match_dense(merged, monkeypatch):
    monkeypatch.setattr(delta_op, "use_merged", lambda *a: merged)  # both routes, same answers
    x, w, b, idx, v = _case()
    rows, cols = split_indices(idx, w.shape[1])
    y = sparse_delta_linear(x, w, b, v, idx, rows, cols)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    dx, dv = x.grad.clone(), v.grad.clone()

    x2 = x.detach().clone().requires_grad_(True)
    delta = torch.zeros(w.numel(), dtype=w.dtype).index_put((idx,), v.detach()).reshape(w.shape).requires_grad_(True)
    y_ref = torch.nn.functional.linear(x2, w + delta, b)
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, x2.grad)
    torch.testing.assert_close(dv, delta.grad.flatten()[idx])  # the sampled dense gradient


def test_empty_delta_is_the_base_layer():
    x, w, b, _, _ = _case()
    e = torch.empty(0, dtype=torch.int64)
    y = sparse_delta_linear(x, w, b, torch.empty(0, dtype=w.dtype), e, e, e)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("merged", [True, False])
def test_cuda_bf16_op_matches_the_float64_reference(merged, monkeypatch):
    monkeypatch.setattr(delta_op, "use_merged", lambda *a: merged)
    x, w, b, idx, v = _case(n=300, din=96, dout=80, k=400)
    rows, cols = split_indices(idx, w.shape[1])
    y_ref = sparse_delta_linear(x, w, b, v, idx, rows, cols)
    dy = torch.randn_like(y_ref)
    (y_ref * dy).sum().backward()
    cuda = lambda t: t.detach().to("cuda", torch.bfloat16)  # noqa: E731
    xc = cuda(x).requires_grad_(True)
    vc = v.detach().float().cuda().requires_grad_(True)
    yc = sparse_delta_linear(xc, cuda(w), cuda(b), vc, idx.cuda(), rows.cuda().int(), cols.cuda().int())
    (yc.float() * dy.cuda().float()).sum().backward()
    for got, ref in [(yc, y_ref), (xc.grad, x.grad), (vc.grad, v.grad)]:
        err = (got.double().cpu() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, err  # bf16 inputs, fp32 accumulation
