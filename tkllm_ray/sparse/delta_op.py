"""The central op (DESIGN.md): y = x (W + Δ)ᵀ + b with Δ sparse, and its backward.

Δ is given per module as `indices` (sorted flat positions r·in + c) with `rows`/`cols` split out,
and `values` (k). W itself never gets a gradient; dv is the sampled product
dv_j = Σ_tokens dy[:, r_j] · x[:, c_j] at the selected entries only (the dense dW is never formed).

Forward and dx take one of two routes, equal up to rounding, whichever moves fewer bytes:
- merged: W' = W with the k entries replaced by W + v (a transient copy of one module's weight),
  then one dense GEMM; the same numerics as serving a merged delta. Best for big token batches.
- gather: y[:, r] += v · x[:, c] on top of x Wᵀ (k·tokens work, no weight copy; in bf16 a value
  below half a step of W still counts here, where the merged route rounds it away); the reference
  for the mixed-user segmented op where each row has its own delta.
dv runs the Triton kernel on CUDA (tkllm_ray.sparse.sddmm_triton) and the chunked torch
reference below elsewhere; tests hold the kernel to this reference.
"""

from __future__ import annotations

import torch

# Entries processed per chunk in the sampled product, bounding the (tokens x chunk) temporaries.
CHUNK = 1 << 16


def check_sorted(indices: torch.Tensor, what: str = "delta indices") -> None:
    """Entries must be sorted and unique: loads, merges and the GPU kernels (which group entries by
    row) all rely on it, and unsorted input would go wrong silently there."""
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{what} must be sorted and unique")


def split_indices(indices: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.div(indices, in_features, rounding_mode="floor"), indices % in_features


def _gather_scale_scatter(src: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor,
                          values: torch.Tensor, width: int) -> torch.Tensor:
    """out[:, scatter_j] += v_j · src[:, gather_j], in chunks of entries."""
    out = src.new_zeros(src.shape[0], width)
    for s in range(0, values.numel(), CHUNK):
        e = s + CHUNK
        out.index_add_(1, scatter[s:e], src[:, gather[s:e]] * values[s:e].to(src.dtype))
    return out


def sparse_forward(x2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                   out_features: int) -> torch.Tensor:
    """x Δᵀ: (tokens, in) -> (tokens, out); y[:, r] += v · x[:, c]."""
    return _gather_scale_scatter(x2, cols, rows, values, out_features)


def sparse_input_grad(dy2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                      in_features: int) -> torch.Tensor:
    """dy Δ: (tokens, out) -> (tokens, in); dx[:, c] += v · dy[:, r]."""
    return _gather_scale_scatter(dy2, rows, cols, values, in_features)


def sampled_grad_reference(dy2: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """dv_j = Σ_t dy[t, r_j] x[t, c_j], accumulated in at least fp32 (bf16 sums over many tokens drift)."""
    acc = torch.promote_types(dy2.dtype, torch.float32)
    out = torch.empty(rows.numel(), dtype=acc, device=dy2.device)
    for s in range(0, rows.numel(), CHUNK):
        e = s + CHUNK
        out[s:e] = (dy2[:, rows[s:e]].to(acc) * x2[:, cols[s:e]].to(acc)).sum(0)
    return out


def sampled_grad(dy2: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    if dy2.is_cuda and rows.numel():
        from tkllm_ray.sparse.sddmm_triton import sampled_grad_triton

        return sampled_grad_triton(dy2, x2, rows, cols)
    return sampled_grad_reference(dy2, x2, rows, cols)


def add_rounded(base: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """base + v summed in at least fp32, rounded once to base's dtype: the one rule for putting a
    delta on a base (training's merged route, serving's in-place apply, HF merge)."""
    acc = torch.promote_types(base.dtype, torch.float32)
    return (base.to(acc) + values.detach().to(device=base.device, dtype=acc)).to(base.dtype)


def merged_weight(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of W with W[idx] = W[idx] + v."""
    w = weight.detach().clone()
    flat = w.view(-1)
    flat[indices] = add_rounded(flat[indices], values)
    return w


def use_merged(tokens: int, k: int, weight: torch.Tensor) -> bool:
    # gather/scatter touches ~k·tokens elements; merging copies the weight once (~numel).
    return k * tokens > weight.numel()


class SparseDeltaLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, rows, cols):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.merged = use_merged(x2.shape[0], values.numel(), weight)
        if ctx.merged:
            y = torch.nn.functional.linear(x2, merged_weight(weight, indices, values), bias)
        else:
            y = torch.nn.functional.linear(x2, weight, bias) + sparse_forward(x2, rows, cols, values, weight.shape[0])
        # x is kept only when dv is wanted (the sampled product needs it); dx needs only W and Δ.
        ctx.save_for_backward(x2 if ctx.needs_input_grad[3] else None, weight, values, indices, rows, cols)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, values, indices, rows, cols = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            if ctx.merged:
                dx = dy2 @ merged_weight(weight, indices, values)
            else:
                dx = dy2 @ weight + sparse_input_grad(dy2, rows, cols, values, weight.shape[1])
            dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dvalues = sampled_grad(dy2, x2, rows, cols).to(values.dtype)
        return dx, None, None, dvalues, None, None, None


def sparse_delta_linear(x, weight, bias, values, indices, rows, cols):
    return SparseDeltaLinearFn.apply(x, weight, bias, values, indices, rows, cols)
