"""Triton kernels for the segmented sparse op (see `segmented.py` for the math and the reference).

All three work on (features, tokens) transposes so every nonzero reads a contiguous run of its
user's tokens (DESIGN.md: "one nonzero reads a contiguous run of that account's activations"):
- forward / dx: a CSR product per (user, run of output lines): the entries of one user that write
  the same output row (forward: sorted by row already) or input column (dx: a column sort,
  computed once per Segments) are summed by one program over a block of that user's tokens: one
  writer per output element, no atomics, no Python loop over users;
- dv: the sampled product (as `sddmm_triton`), with each block of entries inside one user and
  summing over that user's tokens only.
Index plans are built once per `Segments` (cached on it) with torch ops, on the device, without
waiting for the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tkllm_ray.sparse.sddmm_triton import transpose

# Tile sizes: the fastest of `benchmarks/packed_kernels.py`'s sweep on an H200 (16 accounts x 1,024
# tokens, tkllm-s MLP shapes: packed-kernels-nvidia-h200.json); `packed_bench.py --tune` re-sweeps.
CONFIG = {"csr": {"LINES": 16, "BLOCK_J": 8, "BLOCK_T": 128, "num_warps": 4},
          "sddmm": {"BLOCK_E": 32, "BLOCK_T": 32, "num_warps": 8}}


@triton.jit
def _csr_lines(inT, outT, src, vals, line_ptr, tok_off, lines, blocks_per_user, stride_in, stride_out,
               LINES: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr):
    # Program (user u, LINES output lines, BLOCK_T of u's tokens): for each line l,
    # outT[l, t] = Σ_{entries j of (u, l)} v_j · inT[src_j, t]: the line's entries are loaded
    # BLOCK_J at a time and their input rows gathered as one tile. One writer per output element.
    b = tl.program_id(0)
    u = b // blocks_per_user
    l0 = (b % blocks_per_user) * LINES
    t0 = tl.load(tok_off + u)
    t1 = tl.load(tok_off + u + 1)
    ts = t0 + tl.program_id(1) * BLOCK_T
    if ts < t1:
        t = ts + tl.arange(0, BLOCK_T)
        tm = t < t1
        for l in range(l0, tl.minimum(l0 + LINES, lines)):
            p0 = tl.load(line_ptr + u * lines + l)
            p1 = tl.load(line_ptr + u * lines + l + 1)
            if p1 > p0:
                acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
                for j0 in range(p0, p1, BLOCK_J):
                    j = j0 + tl.arange(0, BLOCK_J)
                    jm = j < p1
                    sj = tl.load(src + j, mask=jm, other=0).to(tl.int64)
                    v = tl.load(vals + j, mask=jm, other=0.0).to(tl.float32)
                    x = tl.load(inT + sj[:, None] * stride_in + t[None, :], mask=jm[:, None] & tm[None, :],
                                other=0.0).to(tl.float32)
                    acc += tl.sum(v[:, None] * x, axis=0)
                tl.store(outT + tl.cast(l, tl.int64) * stride_out + t, acc, mask=tm)


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


# Index plans. Every size comes from the host-side counts on the Segments, so building a plan
# launches device work but never waits for it (no .item(), nonzero or unsized repeat_interleave):
# a step issues all its layers' kernels back to back.

def _entry_users(seg) -> torch.Tensor:
    counts = seg.entry_offsets[1:] - seg.entry_offsets[:-1]
    return torch.repeat_interleave(torch.arange(seg.users, device=counts.device), counts,
                                   output_size=sum(seg.entry_counts))


def _line_ptr(key: torch.Tensor, users: int, lines: int) -> torch.Tensor:
    """Entries sorted by key = user·lines + line -> CSR pointers over the (user, line) grid."""
    return torch.searchsorted(key, torch.arange(users * lines + 1, device=key.device))


def _plan_rows(seg, out_features: int) -> dict:
    """Forward: entries by (user, output row), the order they are stored in."""
    key = f"rows{out_features}"
    if key not in seg._plans:
        k = _entry_users(seg) * out_features + seg.rows
        seg._plans[key] = {"src": seg.cols, "perm": None, "ptr": _line_ptr(k, seg.users, out_features)}
    return seg._plans[key]


def _plan_cols(seg, in_features: int) -> dict:
    """Input gradient: entries by (user, input column), one sort per Segments."""
    key = f"cols{in_features}"
    if key not in seg._plans:
        k, perm = torch.sort(_entry_users(seg) * in_features + seg.cols, stable=True)
        seg._plans[key] = {"src": seg.rows[perm], "perm": perm, "ptr": _line_ptr(k, seg.users, in_features)}
    return seg._plans[key]


def _plan_sddmm(seg, block_e: int):
    """dv: each user's entries cut into runs of block_e (no block spans two users)."""
    key = f"sddmm{block_e}"
    if key not in seg._plans:
        dev = seg.entry_offsets.device
        counts = seg.entry_offsets[1:] - seg.entry_offsets[:-1]
        per_user = (counts + block_e - 1) // block_e
        n = sum(triton.cdiv(c, block_e) for c in seg.entry_counts)
        users = torch.repeat_interleave(torch.arange(seg.users, device=dev), per_user, output_size=n)
        first = torch.repeat_interleave(per_user.cumsum(0) - per_user, per_user, output_size=n)
        starts = seg.entry_offsets[users] + (torch.arange(n, device=dev) - first) * block_e
        ends = torch.minimum(starts + block_e, seg.entry_offsets[users + 1])
        seg._plans[key] = (starts, ends, users)
    return seg._plans[key]


def _csr(inT: torch.Tensor, values: torch.Tensor, p: dict, seg, width: int):
    """inT: (features, tokens), already transposed -> (tokens, width) fp32."""
    outT = torch.zeros(width, inT.shape[1], dtype=torch.float32, device=inT.device)
    max_tokens = max(seg.token_counts, default=0)
    if seg.users and max_tokens and seg.rows.numel():
        c = CONFIG["csr"]
        vals = values if p["perm"] is None else values[p["perm"]]
        per_user = triton.cdiv(width, c["LINES"])
        grid = (seg.users * per_user, triton.cdiv(max_tokens, c["BLOCK_T"]))
        _csr_lines[grid](inT, outT, p["src"], vals.contiguous(), p["ptr"], seg.token_offsets, width, per_user,
                         inT.stride(0), outT.stride(0), LINES=c["LINES"], BLOCK_J=c["BLOCK_J"],
                         BLOCK_T=c["BLOCK_T"], num_warps=c["num_warps"])
    return transpose(outT)


def _input_grad_T(dyT: torch.Tensor, values: torch.Tensor, seg, in_features: int) -> torch.Tensor:
    return _csr(dyT, values, _plan_cols(seg, in_features), seg, in_features)


def _sampled_grad_T(dyT: torch.Tensor, xT: torch.Tensor, seg) -> torch.Tensor:
    c = CONFIG["sddmm"]
    starts, ends, users = _plan_sddmm(seg, c["BLOCK_E"])
    out = torch.zeros(seg.rows.numel(), dtype=torch.float32, device=dyT.device)
    if starts.numel():
        _seg_sddmm[(starts.numel(),)](dyT, xT, seg.rows, seg.cols, out, starts, ends, users, seg.token_offsets,
                                      dyT.stride(0), xT.stride(0), BLOCK_E=c["BLOCK_E"], BLOCK_T=c["BLOCK_T"],
                                      num_warps=c["num_warps"])
    return out


def segmented_forward(x2: torch.Tensor, values: torch.Tensor, seg, out_features: int) -> torch.Tensor:
    return _csr(transpose(x2), values, _plan_rows(seg, out_features), seg, out_features)


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
