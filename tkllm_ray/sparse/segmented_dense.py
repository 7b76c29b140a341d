"""The segmented op's delta term through dense GEMMs, for users with many tokens in a batch.

The sparse kernels (`segmented_triton`) cost entries × tokens: each entry reads its user's run of
activations. A training micro-batch gives each user ~1,000 tokens, and GSPF puts percent-level
densities on some modules (the output head above all), so there the gathering costs more than
the dense product it avoids. This route scatters each user's entries into a dense Δ_u (one zeroed
buffer and one scatter per module and group of users) and runs tensor-core GEMMs:

    forward  out[t_u] += x[t_u] Δ_uᵀ        (baddbmm, in place into the base linear's output)
    dx       dx[t_u]  += dy[t_u] Δ_u         (in place into the base linear's input gradient)
    dv_j      = (dy[t_u]ᵀ x[t_u])[r_j, c_j]  (one GEMM per user, read at the entries; fp32 out on CUDA)

Cost ≈ three GEMMs of the layer's shape over the batch's tokens, whatever the density, plus
writing users × out × in bytes; the sparse kernels win at low density or few tokens a user (decode).
`segmented_triton.route` picks per module and batch. Users with equal token counts run as one
batched GEMM; the buffers are bounded by `max_bytes` (users are taken in groups). Torch ops only:
CPU-tested against the reference in CI, and the same code runs on the GPU.
"""

from __future__ import annotations

import torch

MAX_BYTES = 1 << 29  # per dense buffer (Δ or dy_uᵀ x_u of a group of users): 512 MiB


def entry_users(seg) -> torch.Tensor:
    """Each entry's user: the number of user ends at or before its position (one bucketize)."""
    k = sum(seg.entry_counts)
    return torch.bucketize(torch.arange(k, device=seg.entry_offsets.device), seg.entry_offsets[1:], right=True)


def _flat(seg, out_features: int, in_features: int) -> torch.Tensor:
    """(K,) int64 position of each entry in a (users, out, in) buffer, built once per Segments."""
    key = f"dense{out_features}x{in_features}"
    if key not in seg._plans:
        seg._plans[key] = (entry_users(seg) * (out_features * in_features)
                           + seg.rows.long() * in_features + seg.cols.long())
    return seg._plans[key]


def _groups(seg, per_user_bytes: int, max_bytes: int) -> list[tuple[int, int, int, int, int]]:
    """Runs of consecutive users that have both tokens and entries and the same token count, at
    most max_bytes // per_user_bytes users each: (u0, u1, tokens each, t0, e0)."""
    cap = max(1, max_bytes // max(per_user_bytes, 1))
    groups, t0, e0 = [], 0, 0
    for u, (t, e) in enumerate(zip(seg.token_counts, seg.entry_counts)):
        last = groups[-1] if groups else None
        if t and e:
            if last and last[1] == u and last[2] == t and u - last[0] < cap:
                groups[-1] = (last[0], u + 1, t, last[3], last[4])
            else:
                groups.append((u, u + 1, t, t0, e0))
        t0, e0 = t0 + t, e0 + e
    return groups


def _deltas(values: torch.Tensor, seg, group, out_features: int, in_features: int, dtype) -> torch.Tensor:
    """(users of the group, out, in) dense Δ in `dtype`, zero off the entries."""
    u0, u1, _, _, e0 = group
    e1 = e0 + sum(seg.entry_counts[u0:u1])
    size = out_features * in_features
    dense = torch.zeros(u1 - u0, out_features, in_features, dtype=dtype, device=values.device)
    dense.view(-1)[_flat(seg, out_features, in_features)[e0:e1] - u0 * size] = values[e0:e1].to(dtype)
    return dense


def _rows(t: torch.Tensor, group) -> torch.Tensor:
    """The group's rows of t (tokens, width) as (users, tokens each, width): a view."""
    u0, u1, n, t0, _ = group
    return t[t0:t0 + (u1 - u0) * n].view(u1 - u0, n, t.shape[1])


def add_forward(out2: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, seg, keep: bool = True):
    """out2 (tokens, out) += each row's delta term, in place; returns x2 for the backward when `keep`."""
    dout, din = out2.shape[1], x2.shape[1]
    for g in _groups(seg, dout * din * x2.element_size(), MAX_BYTES):
        _add_product(_rows(out2, g), _rows(x2, g), _deltas(values, seg, g, dout, din, x2.dtype).transpose(1, 2))
    return x2 if keep else None


def backward(dy2: torch.Tensor, x2: torch.Tensor | None, values: torch.Tensor, seg, dx2: torch.Tensor | None,
             need_dv: bool) -> torch.Tensor | None:
    """dx2 (tokens, in) += the delta term of the input gradient, in place (when given); returns dv
    (K,) fp32 when `need_dv` (x2: the forward's input)."""
    if dx2 is None and not need_dv:
        return None
    dout = dy2.shape[1]
    din = dx2.shape[1] if dx2 is not None else x2.shape[1]
    dv = torch.zeros(seg.rows.numel(), dtype=torch.float32, device=dy2.device) if need_dv else None
    grad_bytes = 4 if need_dv else dy2.element_size()
    for g in _groups(seg, dout * din * grad_bytes, MAX_BYTES):
        dy3 = _rows(dy2, g)
        if dx2 is not None:
            _add_product(_rows(dx2, g), dy3, _deltas(values, seg, g, dout, din, dy2.dtype))
        if need_dv:
            u0, u1, _, _, e0 = g
            e1 = e0 + sum(seg.entry_counts[u0:u1])
            grad = _user_grads(dy3, _rows(x2, g))
            dv[e0:e1] = grad.view(-1)[_flat(seg, dout, din)[e0:e1] - u0 * dout * din].float()
    return dv


def _add_product(out3: torch.Tensor, a3: torch.Tensor, b3: torch.Tensor) -> None:
    """out3 += a3 @ b3 in place (one fused baddbmm when the dtypes agree, as in training)."""
    if out3.dtype == a3.dtype:
        out3.baddbmm_(a3, b3)
    else:
        out3.add_(torch.bmm(a3, b3))


def _user_grads(dy3: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """dy_uᵀ x_u per user, summed in fp32 and kept in fp32 where the backend can (CUDA's bmm with
    out_dtype), so 16-bit inputs lose nothing the sparse kernel would keep."""
    if dy3.is_cuda and dy3.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(dy3.transpose(1, 2), x3, out_dtype=torch.float32)
    return torch.bmm(dy3.transpose(1, 2), x3)


# Merged weights: for a frozen plain weight the whole op is one GEMM a user, y_u = x_u (W + Δ_u)ᵀ,
# with W + Δ_u summed in fp32 and rounded once to the data's dtype. In bf16 that is standard
# mixed-precision training (a bf16 copy of an fp32 master weight for the forward; the values stay
# fp32 in the optimizer), one GEMM fewer forward and backward than base + delta term.

def _merged(weight: torch.Tensor, values: torch.Tensor, seg, group, dtype) -> torch.Tensor:
    """(users of the group, out, in): W + Δ_u in `dtype`."""
    u0, u1, _, _, e0 = group
    e1 = e0 + sum(seg.entry_counts[u0:u1])
    dout, din = weight.shape
    size = dout * din
    merged = weight.to(dtype).reshape(1, size).repeat(u1 - u0, 1)
    local = _flat(seg, dout, din)[e0:e1] - u0 * size
    acc = torch.promote_types(dtype, torch.float32)  # the sum at least in fp32, rounded once
    merged.view(-1)[local] = (weight.reshape(-1)[local % size].to(acc) + values[e0:e1].to(acc)).to(dtype)
    return merged.view(u1 - u0, dout, din)


def _base_rows(seg, groups) -> list[tuple[int, int]]:
    """Token ranges outside every group (users with tokens but no entries): the base weight alone."""
    spans, t = [], 0
    for u0, u1, n, t0, _ in groups:
        if t0 > t:
            spans.append((t, t0))
        t = t0 + (u1 - u0) * n
    total = sum(seg.token_counts)
    return spans + ([(t, total)] if total > t else [])


def merged_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                  seg) -> torch.Tensor:
    """y2 (tokens, out) = x2 (W + Δ_u)ᵀ + b for each user's rows."""
    dout, din = weight.shape
    y2 = torch.empty(x2.shape[0], dout, dtype=x2.dtype, device=x2.device)
    groups = _groups(seg, dout * din * x2.element_size(), MAX_BYTES)
    for t0, t1 in _base_rows(seg, groups):
        torch.mm(x2[t0:t1], weight.to(x2.dtype).t(), out=y2[t0:t1])
    for g in groups:
        torch.bmm(_rows(x2, g), _merged(weight, values, seg, g, x2.dtype).transpose(1, 2), out=_rows(y2, g))
    return y2 if bias is None else y2.add_(bias.to(y2.dtype))


def merged_backward(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, seg,
                    need_dx: bool, need_dv: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dx2 = dy2 (W + Δ_u) per user's rows, dv (K,) fp32) of merged_linear, each when asked."""
    dx2 = None
    if need_dx:
        dout, din = weight.shape
        dx2 = torch.empty(dy2.shape[0], din, dtype=dy2.dtype, device=dy2.device)
        groups = _groups(seg, dout * din * dy2.element_size(), MAX_BYTES)
        for t0, t1 in _base_rows(seg, groups):
            torch.mm(dy2[t0:t1], weight.to(dy2.dtype), out=dx2[t0:t1])
        for g in groups:
            torch.bmm(_rows(dy2, g), _merged(weight, values, seg, g, dy2.dtype), out=_rows(dx2, g))
    return dx2, backward(dy2, x2, values, seg, None, True) if need_dv else None
