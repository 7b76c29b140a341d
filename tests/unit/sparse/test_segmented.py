"""The segmented sparse op: a mixed-user batch gives each row its own user's W + Δ, forward and
backward; the Triton kernels match the torch reference (interpreter on CPU, real GPU if present)."""

import pytest
import torch

from tkllm_ray.sparse.segmented import Segments, segmented_delta_linear


def _users(seed=0, counts=(5, 0, 9, 3), din=12, dout=10, ks=(7, 4, 0, 15), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dout, din, generator=g, dtype=dtype)
    b = torch.randn(dout, generator=g, dtype=dtype)
    idx = [torch.sort(torch.randperm(din * dout, generator=g)[:k]).values for k in ks]
    vals = [torch.randn(k, generator=g, dtype=dtype) for k in ks]
    x = torch.randn(sum(counts), din, generator=g, dtype=dtype)
    return w, b, idx, vals, x


def test_each_row_uses_its_own_users_delta_forward_and_backward():
    counts = (5, 0, 9, 3)  # a user with no rows in this batch, and (below) one with no entries
    w, b, idx, vals, x = _users(counts=counts)
    seg = Segments.build(list(counts), idx, w.shape[1])
    v = torch.cat(vals).requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    y = segmented_delta_linear(xs, w, b, v, seg)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()

    # Reference: each user's rows through its own dense W + Δ_u.
    t0 = 0
    for u, n in enumerate(counts):
        delta = torch.zeros(w.numel(), dtype=w.dtype).index_put((idx[u],), vals[u]).reshape(w.shape).requires_grad_(True)
        xu = x[t0:t0 + n].clone().requires_grad_(True)
        yu = torch.nn.functional.linear(xu, w + delta, b)
        (yu * dy[t0:t0 + n]).sum().backward()
        torch.testing.assert_close(y[t0:t0 + n], yu)
        torch.testing.assert_close(xs.grad[t0:t0 + n], xu.grad)
        e0 = sum(i.numel() for i in idx[:u])
        torch.testing.assert_close(v.grad[e0:e0 + idx[u].numel()], delta.grad.flatten()[idx[u]])
        t0 += n


def test_merged_weights_route_matches_the_reference(monkeypatch):
    """The fused op's merged-weight route (one GEMM a user on W + Δ_u): output, input gradient and
    sampled gradient equal base + reference delta term. Users without rows, without entries, of
    unequal and equal counts; buffers capped so groups split."""
    from tkllm_ray.sparse import segmented_dense as D
    from tkllm_ray.sparse.segmented import backward_reference, segmented_forward_reference

    counts, ks = (5, 0, 4, 4, 4, 3, 6), (7, 4, 9, 0, 11, 15, 8)
    w, b, idx, vals, x = _users(counts=counts, ks=ks)
    monkeypatch.setattr(D, "MAX_BYTES", 2 * w.numel() * 8)  # at most 2 users a group (float64)
    seg = Segments.build(list(counts), idx, w.shape[1])
    v = torch.cat(vals)
    groups = D._groups(seg, w.numel() * 8, D.MAX_BYTES)
    assert [(g[0], g[1]) for g in groups] == [(0, 1), (2, 3), (4, 5), (5, 6), (6, 7)]
    assert D._base_rows(seg, groups) == [(9, 13)]  # user 3: rows, no entries
    y = D.merged_linear(x, w, b, v, seg)
    torch.testing.assert_close(y, x @ w.t() + b + segmented_forward_reference(x, v, seg, w.shape[0]))
    dy = torch.randn_like(y)
    dx, dv = D.merged_backward(dy, x, w, v, seg, True, True)
    ref_dx = dy @ w
    ref_dv = backward_reference(dy, x, v, seg, ref_dx, True)
    torch.testing.assert_close(dx, ref_dx)
    torch.testing.assert_close(dv, ref_dv.float())
    assert D.merged_backward(dy, x, w, v, seg, False, False) == (None, None)


def test_segments_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="one token count per user"):
        Segments.build([3, 4], [torch.tensor([1])], 8)


CHECK = r"""
import itertools
import torch
from tkllm_ray.sparse import segmented as S, segmented_triton as K
import tkllm_ray.sparse.segmented_dense
dev = "{device}"
g = torch.Generator().manual_seed(1)
din, dout = 40, 24
# Mixed sizes: a user without rows, one without entries, blocks of 16 lines holding more entries
# than one BLOCK_E run (200 entries), and decode-shaped batches (at most DECODE_TOKENS per user:
# the streaming forward kernel), one with line blocks of more entries than its BLOCK_E.
cases = [([70, 0, 130, 3, 64], [50, 9, 0, 200, 65]), ([1, 1, 0, 1], [30, 0, 12, 7]),
         ([2, 4, 1, 3], [600, 30, 0, 900]), ([32, 32, 32, 0, 32, 32], [10, 20, 15, 9, 0, 40])]
tkllm_ray.sparse.segmented_dense.MAX_BYTES = 2 * din * dout * 4  # dense route: groups of at most 2 users (fp32 grads)
small = {{"LINES": 16, "BLOCK_E": 64, "num_warps": 4}}  # line blocks of more entries than one run
assert max(cases[2][0]) <= K.DECODE_TOKENS and 900 * small["LINES"] // dout > small["BLOCK_E"]
# Both routes of the GPU path: the sparse kernels, and dense GEMMs forced for every batch.
for dense, (dtype, decode_tiles) in itertools.product(
        (None, {{"min_tokens": 1, "min_density": 0.0}}),
        ((torch.float32, small), (torch.bfloat16, small), (torch.float32, K.CONFIG["decode"]))):
    K.CONFIG["decode"], K.CONFIG["dense"] = decode_tiles, dense
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 or (dev == "cpu" and not dense) else \
        dict(rtol=1e-2, atol=2e-2)
    for counts, ks in cases:
        idx = [torch.sort(torch.randperm(din * dout, generator=g)[:k]).values for k in ks]
        seg = S.Segments.build(counts, idx, din, device=dev)
        assert K.dense_route(seg, dout, din) == (dense is not None)
        x = torch.randn(sum(counts), din, generator=g).to(dev, dtype)
        dy = torch.randn(sum(counts), dout, generator=g).to(dev, dtype)
        v = torch.randn(sum(ks), generator=g).to(dev)
        base_y = torch.randn(sum(counts), dout, generator=g).to(dev)
        base_dx = torch.randn(sum(counts), din, generator=g).to(dev)
        y = base_y.clone()
        saved = K.add_forward(y, x, v, seg)  # in place, into an fp32 output: the kernel's own error
        dx = base_dx.clone()
        dv = K.backward(dy, saved, v, seg, dx, True)
        refs = [(y, base_y + S.segmented_forward_reference(x.float(), v, seg, dout)),
                (dx, base_dx + S.segmented_input_grad_reference(dy.float(), v, seg, din)),
                (dv, S.segmented_sampled_grad_reference(dy, x, seg))]
        for got, ref in refs:
            assert got.dtype == torch.float32 and got.shape == ref.shape
            torch.testing.assert_close(got, ref.float(), **tol)
        assert K.backward(dy, saved, v, seg, None, False) is None
        # Into the data's own dtype, as the fused op does: equal up to that dtype's rounding.
        yb = base_y.to(dtype)
        K.add_forward(yb, x, v, seg)
        torch.testing.assert_close(yb.float(), refs[0][1].float(), rtol=2e-2, atol=2e-2)
print("ok")
"""


def test_triton_kernels_match_reference(kernel_check):
    kernel_check(CHECK)
