"""The segmented sparse op (DESIGN.md "central operation") for batches that mix users:

    y[t] = x[t] (W + Δ_u(t))ᵀ + b,   t in user u's rows

x's rows are grouped by user (`token_offsets`: user u owns rows [off[u], off[u+1])); each user's
delta is its own sorted entry list, all users' lists concatenated (`entry_offsets`). Backward:
dx through W + Δ_u per row, and dv_j = Σ_{t in u(j)} dy[t, r_j] x[t, c_j] at the selected entries
only (no dense dW, per user or shared). The base GEMM is one call for the whole batch; the delta
part is the per-user sparse term. This file is the torch reference (CPU, CI-tested: it loops over
users, which the GPU path never does); `segmented_triton` holds the CUDA kernels checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


def segmented_backward_reference(dy2: torch.Tensor, x2: torch.Tensor | None, values: torch.Tensor, seg: Segments,
                                 in_features: int, need_dx: bool, need_dv: bool):
    """(delta term of dx or None, dv or None)."""
    dx = segmented_input_grad_reference(dy2, values, seg, in_features) if need_dx else None
    return dx, (segmented_sampled_grad_reference(dy2, x2, seg) if need_dv else None)


def _kernels(t: torch.Tensor):
    """(forward delta term, backward) for t's device: Triton on CUDA, the torch reference elsewhere."""
    if t.is_cuda:
        from tkllm_ray.sparse import segmented_triton

        return segmented_triton.segmented_forward, segmented_triton.segmented_backward
    return segmented_forward_reference, segmented_backward_reference


class SegmentedDeltaFn(torch.autograd.Function):
    """The per-user delta term alone, apart from the base linear: any base (a plain nn.Linear, one
    whose weight DeepSpeed ZeRO-3 gathers in its own forward, a quantized one) adds it to its
    output, and autograd sums the two input gradients."""

    @staticmethod
    def forward(ctx, x, values, seg: Segments, in_features: int, out_features: int):
        x2 = x.reshape(-1, in_features)
        fwd, _ = _kernels(x2)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, values)
        ctx.seg, ctx.x_shape, ctx.in_features = seg, x.shape, in_features
        return fwd(x2, values, seg, out_features).to(x.dtype).reshape(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy):
        x2, values = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        _, backward = _kernels(dy2)
        dx, dv = backward(dy2, x2, values, ctx.seg, ctx.in_features, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (None if dx is None else dx.to(dy.dtype).reshape(ctx.x_shape),
                None if dv is None else dv.to(values.dtype), None, None, None)


def segmented_delta(x, values, seg: Segments, in_features: int, out_features: int):
    """x: (..., in) whose flattened rows follow `seg.token_offsets`; values: (K,) all users'
    values -> the delta term (..., out): row t gets x[t] Δ_u(t)ᵀ."""
    return SegmentedDeltaFn.apply(x, values, seg, in_features, out_features)


def segmented_delta_linear(x, weight, bias, values, seg: Segments):
    """y = x Wᵀ + b + the per-user delta term (the op of DESIGN.md, for a plain weight)."""
    return torch.nn.functional.linear(x, weight, bias) + segmented_delta(x, values, seg, weight.shape[1],
                                                                        weight.shape[0])
