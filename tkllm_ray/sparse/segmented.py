"""The segmented sparse op (DESIGN.md "central operation") for batches that mix users:

    y[t] = x[t] (W + Δ_u(t))ᵀ + b,   t in user u's rows

x's rows are grouped by user (`token_offsets`: user u owns rows [off[u], off[u+1])); each user's
delta is its own sorted entry list, all users' lists concatenated (`entry_offsets`). Backward:
dx through W + Δ_u per row, and dv_j = Σ_{t in u(j)} dy[t, r_j] x[t, c_j] at the selected entries
only (no dense dW, per user or shared). The base GEMM is one call for the whole batch; the delta
part is the per-user sparse term, added in place into the base GEMM's output (and, backward, into
its input gradient). This file is the torch reference (CPU, CI-tested: it loops over
users, which the GPU path never does); `segmented_triton` holds the CUDA kernels checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tkllm_ray.sparse import segmented_dense
from tkllm_ray.sparse.delta_op import (
    check_sorted,
    sampled_grad_reference,
    sparse_forward,
    sparse_input_grad,
    split_indices,
)


@dataclass
class Segments:
    """One module's view of a mixed micro-batch: whose rows are where, whose entries are where."""

    token_offsets: torch.Tensor  # (U + 1,) int64, rows of the flattened x per user
    entry_offsets: torch.Tensor  # (U + 1,) int64, positions in the concatenated entry lists
    rows: torch.Tensor  # (K,) output row of each entry (each user's run sorted by flat index)
    cols: torch.Tensor  # (K,) input column of each entry
    token_counts: tuple[int, ...] = ()  # the same sizes on the host: kernels launch without a device sync
    entry_counts: tuple[int, ...] = ()
    _plans: dict = field(default_factory=dict, repr=False, compare=False)  # GPU index plans, built once

    @classmethod
    def build(cls, token_counts: list[int], indices: list[torch.Tensor], in_features: int,
              device: torch.device | str = "cpu", check: bool = True) -> "Segments":
        """From per-user row counts and per-user sorted flat indices (r·in + c), built where the
        indices are (no host round trip). `check=False` skips the sortedness check (one device sync
        per user) for indices sorted by construction, e.g. a SparseState's."""
        if len(token_counts) != len(indices):
            raise ValueError("one token count per user's indices")
        if check:
            for i in indices:
                check_sorted(i, "each user's delta indices")
        entry_counts = [i.numel() for i in indices]
        flat = torch.cat([i.to(device, torch.int64) for i in indices]) if indices else \
            torch.empty(0, dtype=torch.int64, device=device)
        rows, cols = split_indices(flat, in_features)
        return cls(_offsets(token_counts, device), _offsets(entry_counts, device), rows.to(torch.int32),
                   cols.to(torch.int32), tuple(token_counts), tuple(entry_counts))

    @property
    def users(self) -> int:
        return self.token_offsets.numel() - 1

    def spans(self):
        """(t0, t1, e0, e1) per user, as Python ints (the reference's loop)."""
        tok, ent = self.token_offsets.tolist(), self.entry_offsets.tolist()
        return [(tok[u], tok[u + 1], ent[u], ent[u + 1]) for u in range(self.users)]


def _offsets(counts: list[int], device) -> torch.Tensor:
    """[0, cumsum(counts)...] on `device`, copied asynchronously from pinned memory on CUDA (a
    pageable copy would wait for the GPU)."""
    host = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _per_user(op, src: torch.Tensor, values: torch.Tensor, seg: Segments, width: int):
    out = src.new_zeros(src.shape[0], width)
    rows, cols = seg.rows.long(), seg.cols.long()
    for t0, t1, e0, e1 in seg.spans():
        if t1 > t0 and e1 > e0:
            out[t0:t1] = op(src[t0:t1], rows[e0:e1], cols[e0:e1], values[e0:e1], width)
    return out


def segmented_forward_reference(x2: torch.Tensor, values: torch.Tensor, seg: Segments, out_features: int) -> torch.Tensor:
    """The delta term of y: out[t, r_j] += v_j x[t, c_j] for each user's rows and entries."""
    return _per_user(sparse_forward, x2, values, seg, out_features)


def segmented_input_grad_reference(dy2: torch.Tensor, values: torch.Tensor, seg: Segments, in_features: int) -> torch.Tensor:
    """The delta term of dx: out[t, c_j] += v_j dy[t, r_j]."""
    return _per_user(sparse_input_grad, dy2, values, seg, in_features)


def segmented_sampled_grad_reference(dy2: torch.Tensor, x2: torch.Tensor, seg: Segments) -> torch.Tensor:
    """dv_j = Σ over user u(j)'s rows of dy[t, r_j] x[t, c_j], at least fp32."""
    out = torch.zeros(seg.rows.numel(), dtype=torch.promote_types(dy2.dtype, torch.float32), device=dy2.device)
    rows, cols = seg.rows.long(), seg.cols.long()
    for t0, t1, e0, e1 in seg.spans():
        if t1 > t0 and e1 > e0:
            out[e0:e1] = sampled_grad_reference(dy2[t0:t1], x2[t0:t1], rows[e0:e1], cols[e0:e1])
    return out


def add_forward_reference(out2: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, seg: Segments,
                          keep: bool = True) -> torch.Tensor | None:
    """out2 += the delta term, in place; returns what the backward reads (x2 itself here) when `keep`."""
    out2 += segmented_forward_reference(x2, values, seg, out2.shape[1]).to(out2.dtype)
    return x2 if keep else None


def backward_reference(dy2: torch.Tensor, x2: torch.Tensor | None, values: torch.Tensor, seg: Segments,
                       dx2: torch.Tensor | None, need_dv: bool) -> torch.Tensor | None:
    """dx2 += the delta term of dx in place (when given); dv when `need_dv`."""
    if dx2 is not None:
        dx2 += segmented_input_grad_reference(dy2, values, seg, dx2.shape[1]).to(dx2.dtype)
    return segmented_sampled_grad_reference(dy2, x2, seg) if need_dv else None


def _kernels(t: torch.Tensor):
    """(in-place forward add, backward) for t's device: Triton on CUDA, the torch reference elsewhere."""
    if t.is_cuda:
        from tkllm_ray.sparse import segmented_triton

        return segmented_triton.add_forward, segmented_triton.backward
    return add_forward_reference, backward_reference


def _merged_route(x: torch.Tensor, weight: torch.Tensor, seg: Segments) -> bool:
    """The fused op on a GPU takes merged weights (segmented_dense.merged_linear) where the
    dense route applies and CONFIG["dense"]["merge"] allows; the CPU keeps the reference."""
    if not x.is_cuda:
        return False
    from tkllm_ray.sparse import segmented_triton

    dense = segmented_triton.CONFIG["dense"]
    return bool(dense and dense.get("merge") and segmented_triton.dense_route(seg, *weight.shape))


def _add_delta(out: torch.Tensor, x: torch.Tensor, values: torch.Tensor, seg: Segments, keep: bool):
    """out (..., out) += the delta term of x (..., in), in place, on x's device's kernels; returns
    what the backward reads when `keep`."""
    add, _ = _kernels(x)
    return add(out.view(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), values, seg, keep)


def add_delta_term(out2: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, seg: Segments) -> None:
    """out2 (tokens, out) += the delta term of x2 (tokens, in), in place, without autograd (serving);
    out2 may be a column slice of a wider output (a stacked projection's)."""
    add, _ = _kernels(x2)
    add(out2, x2, values, seg, False)


class SegmentedDeltaAddFn(torch.autograd.Function):
    """Adds the per-user delta term into `base`, the base module's output, in place: any base (a
    plain nn.Linear, one whose weight DeepSpeed ZeRO-3 gathers in its own forward, a quantized one)
    computes its own part, and autograd sums the two input gradients. (A base whose backward reads
    its own output would fail autograd's version check loudly, not silently.)"""

    @staticmethod
    def forward(ctx, base, x, values, seg: Segments):
        saved = _add_delta(base, x, values, seg, ctx.needs_input_grad[2])
        ctx.mark_dirty(base)
        ctx.save_for_backward(saved, values)
        ctx.seg, ctx.x_shape = seg, x.shape
        return base

    @staticmethod
    def backward(ctx, dy):
        saved, values = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx2 = dy2.new_zeros(dy2.shape[0], ctx.x_shape[-1]) if ctx.needs_input_grad[1] else None
        _, backward = _kernels(dy2)
        dv = backward(dy2, saved, values, ctx.seg, dx2, ctx.needs_input_grad[2])
        return (dy, None if dx2 is None else dx2.reshape(ctx.x_shape),
                None if dv is None else dv.to(values.dtype), None)


class SegmentedDeltaLinearFn(torch.autograd.Function):
    """The whole op for a frozen plain weight: y = x Wᵀ + b with the delta term added into y in
    place, and dx = dy W with the delta term added into dx in place (no separate zeroed buffer or
    sum of two input gradients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, seg: Segments):
        ctx.merged = _merged_route(x, weight, seg)
        if ctx.merged:
            x2 = x.reshape(-1, x.shape[-1])
            y = segmented_dense.merged_linear(x2, weight, bias, values, seg).view(*x.shape[:-1], weight.shape[0])
            saved = x2
        else:
            y = torch.nn.functional.linear(x, weight, bias)
            saved = _add_delta(y, x, values, seg, ctx.needs_input_grad[3])
        ctx.save_for_backward(saved, values, weight)
        ctx.seg, ctx.x_shape = seg, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, values, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.merged:
            dx2, dv = segmented_dense.merged_backward(dy2, saved, weight, values, ctx.seg, ctx.needs_input_grad[0],
                                                      ctx.needs_input_grad[3])
        else:
            dx2 = dy2 @ weight.to(dy2.dtype) if ctx.needs_input_grad[0] else None
            _, backward = _kernels(dy2)
            dv = backward(dy2, saved, values, ctx.seg, dx2, ctx.needs_input_grad[3])
        return (None if dx2 is None else dx2.reshape(ctx.x_shape), None, None,
                None if dv is None else dv.to(values.dtype), None)


def segmented_delta_add(base, x, values, seg: Segments):
    """base: the base module's output (..., out) for x (..., in), whose flattened rows follow
    `seg.token_offsets`; values: (K,) all users' values -> base with row t's x[t] Δ_u(t)ᵀ added
    (in place when base is contiguous). Without autograd (serving) the kernels are called directly:
    nothing is saved, and torch.compile sees plain ops."""
    if not torch.is_grad_enabled():
        base = base.contiguous()
        _add_delta(base, x, values, seg, False)
        return base
    return SegmentedDeltaAddFn.apply(base.contiguous(), x, values, seg)


def segmented_delta_linear(x, weight, bias, values, seg: Segments):
    """y = x Wᵀ + b + the per-user delta term (the op of DESIGN.md, for a plain weight): one fused
    op when the weight and bias are frozen, the base linear plus the added term otherwise."""
    if weight.requires_grad or (bias is not None and bias.requires_grad) or not torch.is_grad_enabled():
        return segmented_delta_add(torch.nn.functional.linear(x, weight, bias), x, values, seg)
    return SegmentedDeltaLinearFn.apply(x, weight, bias, values, seg)
