"""Triton kernels for the segmented sparse op (see `segmented.py` for the math and the reference).

All three work on (features, tokens) transposes so every nonzero reads a contiguous run of its
user's tokens (DESIGN.md: "one nonzero reads a contiguous run of that account's activations"):
- forward / dx: a CSR product per (user, output line): the entries of one user that write the
  same output row (forward: sorted by row already) or input column (dx: a per-user column sort,
  computed once per Segments) are summed by one program over that user's tokens: one writer per
  output element, no atomics, no Python loop over users;
- dv: the sampled product (as `sddmm_triton`), with each block of entries inside one user and
  summing over that user's tokens only.
Index plans are built once per `Segments` (cached on it) with torch ops, on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tkllm_ray.sparse.sddmm_triton import transpose

BLOCK_T = 64
BLOCK_E = 64


@triton.jit
def _csr_lines(inT, outT, src, vals, group_ptr, group_out, group_user, tok_off, stride_in, stride_out,
               BLOCK_T: tl.constexpr):
    # outT[line_g, t] = Σ_{j in group g} v_j · inT[src_j, t] over the tokens t of the group's user.
    g = tl.program_id(0)
    u = tl.load(group_user + g)
    t0 = tl.load(tok_off + u)
    t1 = tl.load(tok_off + u + 1)
    t = t0 + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < t1
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in range(tl.load(group_ptr + g), tl.load(group_ptr + g + 1)):
        s = tl.load(src + j).to(tl.int64)
        acc += tl.load(vals + j).to(tl.float32) * tl.load(inT + s * stride_in + t, mask=tm, other=0.0).to(tl.float32)
    line = tl.load(group_out + g).to(tl.int64)
    tl.store(outT + line * stride_out + t, acc, mask=tm)


@triton.jit
def _seg_sddmm(dyT, xT, rows, cols, out, block_start, block_end, block_user, tok_off, stride_dy, stride_x,
               BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    e = tl.load(block_start + b) + tl.arange(0, BLOCK_E)
    e_ok = e < tl.load(block_end + b)
    u = tl.load(block_user + b)
    t0 = tl.load(tok_off + u)
    t1 = tl.load(tok_off + u + 1)
    r = tl.load(rows + e, mask=e_ok, other=0).to(tl.int64)
    c = tl.load(cols + e, mask=e_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for ts in range(t0, t1, BLOCK_T):
        t = ts + tl.arange(0, BLOCK_T)
        m = e_ok[:, None] & (t < t1)[None, :]
        a = tl.load(dyT + r[:, None] * stride_dy + t[None, :], mask=m, other=0.0).to(tl.float32)
        x = tl.load(xT + c[:, None] * stride_x + t[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * x, axis=1)
    tl.store(out + e, acc, mask=e_ok)


def _entry_users(seg) -> torch.Tensor:
    counts = seg.entry_offsets[1:] - seg.entry_offsets[:-1]
    return torch.repeat_interleave(torch.arange(seg.users, device=counts.device), counts)


def _groups(user: torch.Tensor, line: torch.Tensor):
    """Runs of equal (user, line) in entry order -> (ptr (G+1), line (G), user (G))."""
    k = user.numel()
    new = torch.ones(k, dtype=torch.bool, device=user.device)
    if k > 1:
        new[1:] = (user[1:] != user[:-1]) | (line[1:] != line[:-1])
    starts = new.nonzero().flatten()
    ptr = torch.cat([starts, torch.tensor([k], device=user.device)])
    return ptr, line[starts].contiguous(), user[starts].contiguous()


def plan(seg) -> dict:
    """Index plans for the three kernels, built once and cached on the Segments."""
    cached = getattr(seg, "_triton_plan", None)
    if cached is not None:
        return cached
    user = _entry_users(seg)
    rows, cols = seg.rows.long(), seg.cols.long()
    by_row = _groups(user, rows)  # each user's entries are sorted by flat index, hence by row
    perm = torch.sort(user * (int(cols.max()) + 1 if cols.numel() else 1) + cols, stable=True).indices
    by_col = _groups(user[perm], cols[perm])
    # dv blocks: each user's entries cut into BLOCK_E runs, so no block spans two users.
    counts = seg.entry_offsets[1:] - seg.entry_offsets[:-1]
    per_user = (counts + BLOCK_E - 1) // BLOCK_E
    users = torch.repeat_interleave(torch.arange(seg.users, device=counts.device), per_user)
    first = torch.repeat_interleave(per_user.cumsum(0) - per_user, per_user)
    starts = seg.entry_offsets[users] + (torch.arange(users.numel(), device=counts.device) - first) * BLOCK_E
    ends = torch.minimum(starts + BLOCK_E, seg.entry_offsets[users + 1])
    lengths = seg.token_offsets[1:] - seg.token_offsets[:-1]
    out = {"by_row": by_row, "by_col": by_col, "perm": perm, "rows_perm": rows[perm].to(torch.int32).contiguous(),
           "blocks": (starts, ends, users), "max_tokens": int(lengths.max()) if lengths.numel() else 0}
    seg._triton_plan = out
    return out


def _csr(inT: torch.Tensor, src: torch.Tensor, vals: torch.Tensor, groups, seg, width: int, max_tokens: int):
    """inT: (features, tokens), already transposed -> (tokens, width) fp32."""
    outT = torch.zeros(width, inT.shape[1], dtype=torch.float32, device=inT.device)
    ptr, line, user = groups
    if line.numel() and max_tokens:
        grid = (line.numel(), triton.cdiv(max_tokens, BLOCK_T))
        _csr_lines[grid](inT, outT, src, vals.contiguous(), ptr, line, user, seg.token_offsets,
                         inT.stride(0), outT.stride(0), BLOCK_T=BLOCK_T)
    return transpose(outT)


def _input_grad_T(dyT: torch.Tensor, values: torch.Tensor, seg, in_features: int) -> torch.Tensor:
    p = plan(seg)
    return _csr(dyT, p["rows_perm"], values[p["perm"]], p["by_col"], seg, in_features, p["max_tokens"])


def _sampled_grad_T(dyT: torch.Tensor, xT: torch.Tensor, seg) -> torch.Tensor:
    starts, ends, users = plan(seg)["blocks"]
    out = torch.zeros(seg.rows.numel(), dtype=torch.float32, device=dyT.device)
    if starts.numel():
        _seg_sddmm[(starts.numel(),)](dyT, xT, seg.rows, seg.cols, out, starts, ends, users, seg.token_offsets,
                                      dyT.stride(0), xT.stride(0), BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T)
    return out


def segmented_forward(x2: torch.Tensor, values: torch.Tensor, seg, out_features: int) -> torch.Tensor:
    p = plan(seg)
    return _csr(transpose(x2), seg.cols, values, p["by_row"], seg, out_features, p["max_tokens"])


def segmented_input_grad(dy2: torch.Tensor, values: torch.Tensor, seg, in_features: int) -> torch.Tensor:
    return _input_grad_T(transpose(dy2), values, seg, in_features)


def segmented_sampled_grad(dy2: torch.Tensor, x2: torch.Tensor, seg) -> torch.Tensor:
    return _sampled_grad_T(transpose(dy2), transpose(x2), seg)


def segmented_backward(dy2: torch.Tensor, x2: torch.Tensor | None, values: torch.Tensor, seg, in_features: int,
                       need_dx: bool, need_dv: bool):
    """Both backward outputs from one transpose of dy (the two products read the same layout)."""
    dyT = transpose(dy2)
    dx = _input_grad_T(dyT, values, seg, in_features) if need_dx else None
    return dx, (_sampled_grad_T(dyT, transpose(x2), seg) if need_dv else None)
