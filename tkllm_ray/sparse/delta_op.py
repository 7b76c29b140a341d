"""The central op (DESIGN.md): y = x (W + Δ)ᵀ + b with Δ sparse, and its backward.

Δ is given per module as `indices` (sorted flat positions r·in + c, int64) and `values` (k).
Forward adds y[:, r] += v · x[:, c]; backward gives dx through W + Δ and dv only at the
selected entries, dv_j = Σ_tokens dy[:, r_j] · x[:, c_j] (a sampled dyᵀx; the dense dW is never
formed). W itself gets no gradient. This is the CPU reference; GPU kernels are checked against it.
"""

from __future__ import annotations

import torch

# Entries processed per chunk in the sampled product, bounding the (tokens x chunk) temporaries.
CHUNK = 1 << 16


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


def sampled_grad(dy2: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """dv_j = Σ_t dy[t, r_j] x[t, c_j], accumulated in at least fp32 (bf16 sums over many tokens drift)."""
    acc = torch.promote_types(dy2.dtype, torch.float32)
    out = torch.empty(rows.numel(), dtype=acc, device=dy2.device)
    for s in range(0, rows.numel(), CHUNK):
        e = s + CHUNK
        out[s:e] = (dy2[:, rows[s:e]].to(acc) * x2[:, cols[s:e]].to(acc)).sum(0)
    return out


class SparseDeltaLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, values, rows, cols):
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.nn.functional.linear(x2, weight, bias) + sparse_forward(x2, rows, cols, values, weight.shape[0])
        ctx.save_for_backward(x2, weight, values, rows, cols)
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, values, rows, cols = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight + sparse_input_grad(dy2, rows, cols, values, weight.shape[1])).reshape(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            dvalues = sampled_grad(dy2, x2, rows, cols).to(values.dtype)
        return dx, None, None, dvalues, None, None


def sparse_delta_linear(x, weight, bias, values, rows, cols):
    return SparseDeltaLinearFn.apply(x, weight, bias, values, rows, cols)
