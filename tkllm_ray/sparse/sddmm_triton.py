"""Triton kernel for GSPF's weight gradient at the selected entries (a sampled dense-dense
product, SDDMM): dv_j = Σ_t dy[t, r_j] · x[t, c_j], fp32 accumulation, no dense dW.

Layout: per chunk of tokens, dy and x are transposed to (features, tokens) so each entry reads
two contiguous token runs (coalesced), and entries sorted by flat index share dy's row in cache.
The grid is (entry blocks, token splits); each program writes a partial sum and the splits are
added with torch, so the result is deterministic (no float atomics).
Checked against `delta_op.sampled_grad_reference` on the CPU through Triton's interpreter
(TRITON_INTERPRET=1) in CI, and on the GPU by the GPU-marked tests and the benchmark.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per transposed chunk: bounds the transient copies to TOKENS_PER_CHUNK·(in + out) values.
TOKENS_PER_CHUNK = 4096


@triton.jit
def _sddmm_partial(dyT, xT, rows, cols, partial, k, n_tok, stride_dy, stride_x,
                   TOK_PER_PROG: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_e = tl.program_id(0)
    pid_t = tl.program_id(1)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < k
    r = tl.load(rows + e, mask=e_ok, other=0).to(tl.int64)
    c = tl.load(cols + e, mask=e_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    t_start = pid_t * TOK_PER_PROG
    for t0 in range(0, TOK_PER_PROG, BLOCK_T):
        t = t_start + t0 + tl.arange(0, BLOCK_T)
        m = e_ok[:, None] & (t < n_tok)[None, :]
        a = tl.load(dyT + r[:, None] * stride_dy + t[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(xT + c[:, None] * stride_x + t[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=1)
    tl.store(partial + pid_t * k + e, acc, mask=e_ok)


@triton.jit
def _transpose_tile(src, dst, n_rows, n_cols, stride_src, stride_dst, BR: tl.constexpr, BC: tl.constexpr):
    # Read a (BR x BC) tile coalesced along src's rows, write it coalesced along dst's rows.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r < n_rows)[:, None] & (c < n_cols)[None, :]
    tile = tl.load(src + r[:, None].to(tl.int64) * stride_src + c[None, :], mask=m)
    tl.store(dst + c[:, None].to(tl.int64) * stride_dst + r[None, :], tl.trans(tile), mask=tl.trans(m))


def transpose(src: torch.Tensor, block: int = 64) -> torch.Tensor:
    """A contiguous copy of src.T (2-D). torch's generic strided copy runs this at a fraction of
    memory bandwidth on an H100 (the benchmark measures both), and SDDMM needs two per chunk."""
    n_rows, n_cols = src.shape
    if src.stride(1) != 1:
        src = src.contiguous()
    dst = torch.empty(n_cols, n_rows, dtype=src.dtype, device=src.device)
    grid = (triton.cdiv(n_rows, block), triton.cdiv(n_cols, block))
    _transpose_tile[grid](src, dst, n_rows, n_cols, src.stride(0), dst.stride(0), BR=block, BC=block)
    return dst


def sampled_grad_triton(dy2: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                        block_e: int = 64, block_t: int = 64, tok_per_prog: int = 512, num_warps: int = 4,
                        tokens_per_chunk: int = TOKENS_PER_CHUNK) -> torch.Tensor:
    """dy2: (tokens, out), x2: (tokens, in), rows/cols: (k,) int32/int64 -> dv (k,) fp32."""
    if tok_per_prog % block_t:
        raise ValueError("tok_per_prog must be a multiple of block_t")
    k, n = rows.numel(), dy2.shape[0]
    out = torch.zeros(k, dtype=torch.float32, device=dy2.device)
    if k == 0 or n == 0:
        return out
    rows, cols = rows.contiguous(), cols.contiguous()
    for t0 in range(0, n, tokens_per_chunk):
        dyT = transpose(dy2[t0 : t0 + tokens_per_chunk])
        xT = transpose(x2[t0 : t0 + tokens_per_chunk])
        n_tok = dyT.shape[1]
        splits = triton.cdiv(n_tok, tok_per_prog)
        partial = torch.empty(splits, k, dtype=torch.float32, device=dy2.device)
        grid = (triton.cdiv(k, block_e), splits)
        _sddmm_partial[grid](dyT, xT, rows, cols, partial, k, n_tok, dyT.stride(0), xT.stride(0),
                             TOK_PER_PROG=tok_per_prog, BLOCK_E=block_e, BLOCK_T=block_t, num_warps=num_warps)
        out += partial.sum(0)
    return out
