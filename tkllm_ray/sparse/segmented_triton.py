"""Triton kernels for the segmented sparse op (see `segmented.py` for the math and the reference).

Each kernel works on blocks of LINES consecutive lines of one user (output rows for the forward
and dv, input columns for dx) and turns the block's irregular entries into one tensor-core product
per BLOCK_E entries, using a one-hot-by-line matrix of the entry values:
- forward / dx: out[t, lines] += X_g[t, entries] @ onehot(entries -> lines, values), where X_g
  gathers each entry's input row of a (features, tokens) transpose: a contiguous run of that
  user's tokens (DESIGN.md: "one nonzero reads a contiguous run of that account's activations").
  The result is added in place into the (tokens, width) output the caller owns (the base linear's
  output or input gradient), so there is no (width, tokens) buffer, transpose back, cast or add;
  one writer per output element, no atomics, no Python loop over users;
- dv: D[lines, entries] = dyᵀ[lines, tokens] @ X_g[tokens, entries] over the user's tokens, then
  dv_e = D[line(e), e]: dy's rows are read once per block instead of once per entry.
- decode-shaped forwards (a few tokens per user: serving) stream the entries instead: a tensor-core
  product would be 15/16 padding there, and the cost is reading the entries (column and value,
  4-6 bytes each), so each program reads long runs of them and sums v·x[t, col] per line from a
  running sum in registers.
Blocks without entries return at once. Index plans are built once per `Segments` (cached on it)
with torch ops, on the device, without waiting for the device.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

from tkllm_ray.sparse import segmented_dense
from tkllm_ray.sparse.sddmm_triton import transpose

# Tile sizes: `benchmarks/packed_kernels.py` sweeps them at tkllm-s shapes (16 accounts x 1,024
# tokens) and `packed_bench.py --tune` trains with the fastest. BLOCK_T shrinks to the largest
# user's token count (decode: one token per account), never below tl.dot's 16.
# Defaults: the H100 sweeps' best (packed-kernels- and decode-kernels-nvidia-h100-80gb-hbm3.json).
CONFIG = {"csr": {"LINES": 16, "BLOCK_E": 32, "BLOCK_T": 128, "num_warps": 8},
          "sddmm": {"LINES": 16, "BLOCK_E": 64, "BLOCK_T": 32, "SPLIT": 1, "num_warps": 4},
          # decode: the sweep over the serving pool, each kind of launch over all 24 layers in turn
          # (entries from DRAM, as in a step). PREFETCH (the next chunk's entries loaded before this
          # one's sums) was 5-20% faster for every kind.
          "decode": {"LINES": 128, "BLOCK_E": 256, "num_warps": 2, "PREFETCH": True},
          # "<out>x<in>" -> tiles for that layer shape (a grouped launch's stacked shape, e.g.
          # "6144x2048" for q/k/v): tkllm-s's kinds' best on an H100 for this kernel
          # (decode-kernels-session12-…json, the winners confirmed taking turns with the tiles before:
          # decode-probes-session12-…json; q/k/v 0.93x, gate/up 0.97x, lm_head 0.96x)
          "decode_by_shape": {
              "6144x2048": {"LINES": 256, "BLOCK_E": 256, "num_warps": 4, "PREFETCH": True},  # q/k/v
              "2048x2048": {"LINES": 128, "BLOCK_E": 256, "num_warps": 4, "PREFETCH": True},  # o
              "11264x2048": {"LINES": 512, "BLOCK_E": 512, "num_warps": 4, "PREFETCH": True},  # gate/up
              "2048x5632": {"LINES": 128, "BLOCK_E": 256, "num_warps": 4, "PREFETCH": True},  # down
              "32000x2048": {"LINES": 256, "BLOCK_E": 256, "num_warps": 4, "PREFETCH": True}},  # lm_head
          # Line-block tiles for batches of at most PREFILL_TOKENS tokens a user (a serving prefill of
          # many accounts' prompts; also a training batch that small, forward and dx), set by
          # decode_kernels.py's prefill sweep.
          # (H100 sweep: 22 ms a 64 x 32-token prefill over the model's layers, 29 ms with "csr"'s tiles;
          # session 13, the grouped launches over the slot pool: 8.0 ms, 10.3 with the tiles before,
          # prefill-kernels-session13-…json)
          "csr_prefill": {"LINES": 16, "BLOCK_E": 64, "BLOCK_T": 128, "num_warps": 2},
          # The dense-GEMM route (segmented_dense) for a module's batch whose users with entries
          # all have min_tokens tokens and min_density of the module's weights on average; None: never.
          # merge: a frozen plain weight's whole op as one GEMM a user on W + Δ_u (merged_linear).
          # Off: on an H100 packed tkllm-s ran no faster with it (3,272/h vs 3,344/h; the steps are
          # bound by launches and elementwise ops there), and bf16(W + Δ) rounds small deltas.
          "dense": {"min_tokens": 128, "min_density": 0.002, "merge": False}}
DECODE_TOKENS = 4  # at most this many tokens per user: the streaming forward kernel
PREFILL_TOKENS = 64  # at most this many (and more than DECODE_TOKENS): CONFIG["csr_prefill"]'s tiles


@triton.jit
def _entries(src, vals, e, em, PACKED: tl.constexpr):
    """Entries e's (input column, value). PACKED: one int32 an entry, the value's 16 bits above the
    column's (the slot pool's layout for 16-bit values; `vals` is then only a pointer of the
    values' dtype). On an H100 the decode kernel ran ~9% faster with one load of 4 bytes than with
    two of 2. (The line-block kernel loads the words itself, in its two tiles' shapes.)"""
    if PACKED:
        pk = tl.load(src + e, mask=em, other=0)
        return pk & 0xFFFF, (pk >> 16).to(tl.int16).to(vals.dtype.element_ty, bitcast=True)
    return tl.load(src + e, mask=em, other=0), tl.load(vals + e, mask=em, other=0.0)


@triton.jit
def _member(r, off0, off1, off2, GROUP: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
            C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr):
    """A grouped launch's member module for a user's block r: (its block within the module, its
    pointer offset in a user's run, its lines, its first output column). GROUP (1-3) modules read
    the same input (q/k/v, gate/up: one launch), each writing its own columns of one stacked output:
    module j has N_j lines, its pointers at off_j in a user's run, its first output column C_j, and
    its line blocks start at block S_j of a user's (S_0 = 0). The layout is a compile-time constant:
    a program's first loads are its pointers."""
    if GROUP == 1:
        return r, off0, N0, C0
    elif GROUP == 2:
        second = r >= S1
        return tl.where(second, r - S1, r), tl.where(second, off1, off0), tl.where(second, N1, N0), \
            tl.where(second, C1, C0)
    else:
        j = (r >= S1).to(tl.int32) + (r >= S2).to(tl.int32)
        return (tl.where(j == 2, r - S2, tl.where(j == 1, r - S1, r)), tl.where(j == 2, off2, tl.where(j == 1, off1, off0)),
                tl.where(j == 2, N2, tl.where(j == 1, N1, N0)), tl.where(j == 2, C2, tl.where(j == 1, C1, C0)))


@triton.jit
def _csr_add(srcT, out, src, dst, vals, ptr, tok_off, umap, blocks_per_user, stride_src, stride_out, stride_ptr, off0,
             off1, off2, LINES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, HALF: tl.constexpr,
             MAPPED: tl.constexpr, PACKED: tl.constexpr, GROUP: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr,
             N2: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr,
             S2: tl.constexpr, ALIGN: tl.constexpr):
    # Program (user u, lines [l0, l0 + LINES) of a member module (_member), BLOCK_T of u's tokens):
    # out[t, col + l] += Σ_{entries e of (u, l)} v_e · srcT[src_e, t].
    # u's line pointers start at ptr[u' · stride_ptr], u' = umap[u] if MAPPED else u (see _csr_decode).
    # ALIGN: every user's first token and token count are multiples of it (the gather of srcT's
    # token runs then loads 16 bytes at a time, not one element).
    b = tl.program_id(0)
    u = b // blocks_per_user
    r, off, lines, col = _member(b % blocks_per_user, off0, off1, off2, GROUP, N0, N1, N2, C0, C1, C2, S1, S2)
    l0 = r * LINES
    t0 = tl.load(tok_off + u)
    t1 = tl.load(tok_off + u + 1)
    if ALIGN > 1:
        t0 = tl.multiple_of(t0, ALIGN)
        t1 = tl.multiple_of(t1, ALIGN)
    ts = t0 + tl.program_id(1) * BLOCK_T
    if MAPPED:
        us = tl.load(umap + u)
    else:
        us = u
    base = ptr + off + us * stride_ptr
    p0 = tl.load(base + l0)
    p1 = tl.load(base + tl.minimum(l0 + LINES, lines))
    if (ts < t1) & (p1 > p0):
        t = ts + tl.arange(0, BLOCK_T)
        tm = t < t1
        ls = tl.arange(0, LINES)
        acc = tl.zeros((BLOCK_T, LINES), dtype=tl.float32)
        for e0 in range(p0, p1, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            em = e < p1
            d = tl.load(dst + e, mask=em, other=-1) - l0
            if PACKED:  # the words loaded in each tile's own shape: one 1-D load then changed the
                # layout of one of them (12% slower than entries apart; this, 10% faster)
                s2 = _entries(src, vals, e[None, :], em[None, :], PACKED)[0].to(tl.int64)
                v2 = _entries(src, vals, e[:, None], em[:, None], PACKED)[1]
            else:
                s, v = _entries(src, vals, e, em, PACKED)
                s2, v2 = s.to(tl.int64)[None, :], v[:, None]
            hit = d[:, None] == ls[None, :]
            xg = tl.load(srcT + s2 * stride_src + t[:, None], mask=em[None, :] & tm[:, None], other=0.0)
            if HALF:
                xb = xg.to(tl.bfloat16)
                if vals.dtype.element_ty == tl.bfloat16:  # the values are bf16 already: one exact product
                    acc = tl.dot(xb, tl.where(hit, v2, 0.0).to(tl.bfloat16), acc)
                else:
                    # other values as a high and a low bf16 part (two products, exact to ~2^-16
                    # of v), the inputs as they are
                    onehot = tl.where(hit, v2.to(tl.float32), 0.0)
                    hi = onehot.to(tl.bfloat16)
                    acc = tl.dot(xb, hi, acc)
                    acc = tl.dot(xb, (onehot - hi.to(tl.float32)).to(tl.bfloat16), acc)
            else:
                acc = tl.dot(xg.to(tl.float32), tl.where(hit, v2.to(tl.float32), 0.0), acc, input_precision="ieee")
        m = tm[:, None] & ((l0 + ls) < lines)[None, :]
        o = out + t[:, None].to(tl.int64) * stride_out + col + (l0 + ls)[None, :]
        cur = tl.load(o, mask=m, other=0.0)
        tl.store(o, (cur.to(tl.float32) + acc).to(cur.dtype), mask=m)


@triton.jit
def _csr_decode(x, out, src, vals, ptr, tok_off, umap, blocks_per_user, stride_x, stride_out, stride_ptr, off0, off1,
                off2, LINES: tl.constexpr, BLOCK_E: tl.constexpr, MAPPED: tl.constexpr, GROUP: tl.constexpr,
                PREFETCH: tl.constexpr, PACKED: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                ONE: tl.constexpr):
    # Program (user u, lines [l0, l0 + LINES)), for each of u's few tokens t:
    # out[t, l] += Σ_{entries e of (u, l)} v_e · x[t, src_e], the entries read BLOCK_E at a time.
    # Lines are runs of the sorted entries, so per-line sums are differences of the chunks'
    # running sums at the runs' ends (O(1) work an entry, whatever LINES; no row is read). u's line
    # pointers start at ptr[u' · stride_ptr]: u' = u and stride `lines` for one CSR over the
    # (user, line) grid; serving's slot pool has a pointer run per slot (stride P) and maps a
    # batch's users to their slots (umap).
    # GROUP, N, C, S: 1-3 modules that read the same x in one launch (_member).
    # PREFETCH: the next chunk's entries are loaded before this chunk's sums (more bytes in flight).
    # PACKED: each entry's column and value as one int32 (_entries).
    # ONE: every user has one token, token u (a decode step; the pool's tok_off is 0..users).
    # The constant layout and ONE together took a step's delta kernels from 1.147 to 1.060 ms on
    # an H100; either alone gained little (decode-probes-session12-nvidia-h100-80gb-hbm3.json).
    b = tl.program_id(0)
    u = b // blocks_per_user
    r, off, lines, col = _member(b % blocks_per_user, off0, off1, off2, GROUP, N0, N1, N2, C0, C1, C2, S1, S2)
    ptr += off
    l0 = r * LINES
    if MAPPED:
        us = tl.load(umap + u)
    else:
        us = u
    base = ptr + us * stride_ptr
    ls = tl.arange(0, LINES)
    lm = (l0 + ls) < lines
    p0 = tl.load(base + l0)  # the block's entries: [p0, p1); line l's end: hi[l]
    p1 = tl.load(base + tl.minimum(l0 + LINES, lines))
    hi = tl.load(base + l0 + ls + 1, mask=lm, other=p1)
    if ONE:  # one token a user (a decode step): token u, known without a load or a loop
        _decode_token(x + u * stride_x, out + u * stride_out + col + l0, src, vals, p0, p1, hi, lm, LINES, BLOCK_E,
                      PREFETCH, PACKED)
    else:
        for t in range(tl.load(tok_off + u), tl.load(tok_off + u + 1)):
            _decode_token(x + t * stride_x, out + t * stride_out + col + l0, src, vals, p0, p1, hi, lm, LINES,
                          BLOCK_E, PREFETCH, PACKED)


@triton.jit
def _decode_token(x, out, src, vals, p0, p1, hi, lm, LINES: tl.constexpr, BLOCK_E: tl.constexpr,
                  PREFETCH: tl.constexpr, PACKED: tl.constexpr):
    # One token's sums over a block's lines: x its input row, out its block of output (_csr_decode).
    # upto[l]: Σ over chunks of the chunk's running sum at line l's end (0 before the chunk).
    # A line starts where the one before it ends, so its sum is upto[l] - upto[l - 1]: one
    # gather a chunk, and one shift at the end.
    ls = tl.arange(0, LINES)
    upto = tl.zeros((LINES,), dtype=tl.float32)
    if PREFETCH:
        e = p0 + tl.arange(0, BLOCK_E)
        em = e < p1
        s, v = _entries(src, vals, e, em, PACKED)
    for e0 in range(p0, p1, BLOCK_E):
        if PREFETCH:
            en = e0 + BLOCK_E + tl.arange(0, BLOCK_E)
            enm = en < p1
            s_next, v_next = _entries(src, vals, en, enm, PACKED)
        else:
            e = e0 + tl.arange(0, BLOCK_E)
            em = e < p1
            s, v = _entries(src, vals, e, em, PACKED)
        xv = tl.load(x + s, mask=em, other=0.0).to(tl.float32)
        run = tl.cumsum(v.to(tl.float32) * xv, axis=0)  # run[i] = Σ of the chunk's first i + 1 products
        z = tl.minimum(tl.maximum(hi - e0, 0), BLOCK_E)  # the chunk's entries up to line l's end: [0, z)
        upto += tl.where(z > 0, tl.gather(run, tl.maximum(z - 1, 0).to(tl.int32), 0), 0.0)
        if PREFETCH:
            s, v, em = s_next, v_next, enm
    before = tl.gather(upto, tl.maximum(ls - 1, 0), 0)
    acc = upto - tl.where(ls > 0, before, 0.0)
    cur = tl.load(out + ls, mask=lm, other=0.0)
    tl.store(out + ls, (cur.to(tl.float32) + acc).to(cur.dtype), mask=lm)


@triton.jit
def _sddmm_lines(dyT, xT, cols, rows, dv, ptr, tok_off, lines, blocks_per_user, stride_dy, stride_x,
                 LINES: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr,
                 HALF: tl.constexpr):
    # Program (user u, output rows [l0, l0 + LINES), every SPLIT-th run of BLOCK_E of their
    # entries): D = dyT[rows, u's tokens] @ xT[cols_e, u's tokens]ᵀ, dv_e = D[row_e - l0, e].
    b = tl.program_id(0)
    u = b // blocks_per_user
    l0 = (b % blocks_per_user) * LINES
    t0 = tl.load(tok_off + u)
    t1 = tl.load(tok_off + u + 1)
    p0 = tl.load(ptr + u * lines + l0)
    p1 = tl.load(ptr + u * lines + tl.minimum(l0 + LINES, lines))
    ls = tl.arange(0, LINES)
    lm = (l0 + ls) < lines
    for e0 in range(p0 + tl.program_id(1) * BLOCK_E, p1, SPLIT * BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        em = e < p1
        c = tl.load(cols + e, mask=em, other=0).to(tl.int64)
        r = tl.load(rows + e, mask=em, other=-1) - l0
        acc = tl.zeros((LINES, BLOCK_E), dtype=tl.float32)
        for ts in range(t0, t1, BLOCK_T):
            t = ts + tl.arange(0, BLOCK_T)
            tm = t < t1
            a = tl.load(dyT + (l0 + ls)[:, None].to(tl.int64) * stride_dy + t[None, :], mask=lm[:, None] & tm[None, :],
                        other=0.0)
            xg = tl.load(xT + c[None, :] * stride_x + t[:, None], mask=em[None, :] & tm[:, None], other=0.0)
            if HALF:  # bf16 x bf16 products are exact; the sums are fp32
                acc = tl.dot(a, xg, acc)
            else:
                acc = tl.dot(a.to(tl.float32), xg.to(tl.float32), acc, input_precision="ieee")
        tl.store(dv + e, tl.sum(tl.where(r[None, :] == ls[:, None], acc, 0.0), axis=0), mask=em)


# Index plans. Every size comes from the host-side counts on the Segments, so building a plan
# launches device work but never waits for it (no .item(), nonzero or unsized repeat_interleave):
# a step issues all its layers' kernels back to back.

_entry_users = segmented_dense.entry_users  # (one bucketize; repeat_interleave's kernel took ~150 us per module on an H100)


def _line_ptr(key: torch.Tensor, users: int, lines: int) -> torch.Tensor:
    """Entries sorted by key = user·lines + line -> CSR pointers over the (user, line) grid."""
    return torch.searchsorted(key, torch.arange(users * lines + 1, device=key.device))


def _plan_rows(seg, out_features: int) -> dict:
    """Forward and dv: entries by (user, output row), the order they are stored in."""
    key = f"rows{out_features}"
    if key not in seg._plans:
        k = _entry_users(seg) * out_features + seg.rows
        seg._plans[key] = {"src": seg.cols, "dst": seg.rows, "perm": None,
                           "ptr": _line_ptr(k, seg.users, out_features)}
    return seg._plans[key]


def _plan_cols(seg, in_features: int) -> dict:
    """Input gradient: entries by (user, input column), one sort per Segments."""
    key = f"cols{in_features}"
    if key not in seg._plans:
        k, perm = torch.sort(_entry_users(seg) * in_features + seg.cols, stable=True)
        seg._plans[key] = {"src": seg.rows[perm], "dst": seg.cols[perm], "perm": perm,
                           "ptr": _line_ptr(k, seg.users, in_features)}
    return seg._plans[key]


def _half(t: torch.Tensor) -> bool:
    """Feed tl.dot bf16 operands (bf16 data on a GPU) or fp32 ones (fp32 data; and Triton's
    interpreter, which CI checks the kernels with and which gets bf16 dots wrong, so there the
    16-bit path is covered by the GPU-marked tests)."""
    return t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") != "1"


def _block_t(seg, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(seg.token_counts, default=1))))


def _has_work(seg) -> bool:
    """Some user has both rows and entries in this batch (else every kernel would write nothing)."""
    return bool(seg.users and max(seg.token_counts, default=0) and seg.rows.numel())


def _packed(values: torch.Tensor | None, p: dict) -> torch.Tensor | None:
    """The launchers' `vals`: the values, or None for a plan whose `src` entries carry them (the
    slot pool's packed layout; refused for any other plan)."""
    if values is not None:
        return values.contiguous()
    if not p.get("packed"):
        raise ValueError("values are None but the plan's entries are not packed")
    return None


def _csr_into(out: torch.Tensor, srcT: torch.Tensor, values: torch.Tensor | None, p: dict, seg) -> None:
    """out (tokens, width) += the delta term, reading srcT (features, tokens); `p` is the plan
    over out's width (rows for the forward, columns for dx). values None: packed entries (_packed)."""
    if not _has_work(seg):
        return
    if values is not None and p["perm"] is not None:
        values = values[p["perm"]]
    width = out.shape[1]
    csr_add(out, srcT, p["src"], p["dst"], _packed(values, p), p["ptr"], seg.token_offsets, p.get("map"), seg.users,
            p.get("stride", width), [0, width, 0], seg.token_counts)


def csr_add(out: torch.Tensor, srcT: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, vals: torch.Tensor | None,
            ptr: torch.Tensor, tok_off: torch.Tensor, umap: torch.Tensor | None, users: int, stride_ptr: int,
            group: list[int], token_counts) -> None:
    """The line-block kernel (out += the delta term, in place, reading srcT (features, tokens)) over
    `users` users with `token_counts` tokens each (user u's from tok_off[u]), through their line
    pointers at ptr[u' · stride_ptr] (u' = umap[u], or u). `group`: (pointer offset in a user's
    run, lines, first output column) of each of 1-3 modules that read srcT, flat (decode_add's).
    vals None: `src` holds packed entries (_entries). tok_off must be the running sum of
    token_counts from 0: the kernel is told its offsets' alignment from the counts."""
    most = max(token_counts)
    c = CONFIG["csr_prefill" if most <= PREFILL_TOKENS else "csr"]
    offs, blocks, layout = _group_launch(group, c["LINES"])
    bt = max(16, min(c["BLOCK_T"], triton.next_power_of_2(most)))
    # every user's token run starts on a multiple of 16 when every count is a multiple of 16
    # (tok_off: the counts' running sum from 0, as every caller builds it)
    align = 16 if all(k % 16 == 0 for k in token_counts) else 1
    _csr_add[(users * blocks, triton.cdiv(most, bt))](
        srcT, out, src, dst, srcT if vals is None else vals, ptr, tok_off, tok_off if umap is None else umap,
        blocks, srcT.stride(0), out.stride(0), stride_ptr, *offs, LINES=c["LINES"], BLOCK_E=c["BLOCK_E"],
        BLOCK_T=bt, HALF=_half(srcT), MAPPED=umap is not None, PACKED=vals is None, ALIGN=align, **layout,
        num_warps=c["num_warps"])


def _group_launch(group: list[int], lines_per_block: int) -> tuple[list[int], int, dict]:
    """A grouped launch's arguments from its flat (pointer offset, lines, first column) per module:
    the three offsets, line blocks a user, and the compile-time layout _member reads."""
    n = len(group) // 3
    if len(group) % 3 or not 1 <= n <= 3:
        raise ValueError(f"a delta launch takes 1 to 3 modules' (offset, lines, column), got {len(group)} numbers")
    offs, lines, cols = (list(group[i::3]) + [0] * (3 - n) for i in range(3))
    starts = group_blocks(lines[:n], lines_per_block) + [0, 0]
    return offs, starts[n], dict(GROUP=n, N0=lines[0], N1=lines[1], N2=lines[2], C0=cols[0], C1=cols[1], C2=cols[2],
                                 S1=starts[1] if n > 1 else 0, S2=starts[2] if n > 2 else 0)


def sampled_grad_T(dyT: torch.Tensor, xT: torch.Tensor, seg, out_features: int) -> torch.Tensor:
    """dv (K,) fp32 from the (features, tokens) transposes of dy and x."""
    out = torch.zeros(seg.rows.numel(), dtype=torch.float32, device=dyT.device)
    if not _has_work(seg):
        return out
    c = CONFIG["sddmm"]
    p = _plan_rows(seg, out_features)
    per_user = triton.cdiv(out_features, c["LINES"])
    _sddmm_lines[(seg.users * per_user, c["SPLIT"])](
        dyT, xT, p["src"], p["dst"], out, p["ptr"], seg.token_offsets, out_features, per_user, dyT.stride(0),
        xT.stride(0), LINES=c["LINES"], BLOCK_E=c["BLOCK_E"], BLOCK_T=_block_t(seg, c["BLOCK_T"]),
        SPLIT=c["SPLIT"], HALF=_half(dyT) and _half(xT), num_warps=c["num_warps"])
    return out


def decode_tiles(*shapes: tuple[int, int]) -> dict:
    """The decode kernel's tiles: those swept for the first of `shapes` ((out, in); a grouped
    launch gives its stacked shape, then its first module's) that CONFIG has, else the default."""
    c = next((CONFIG["decode_by_shape"][k] for k in (f"{o}x{i}" for o, i in shapes) if k in CONFIG["decode_by_shape"]),
             CONFIG["decode"])
    return {"PREFETCH": False, **c}


def tile_args(c: dict) -> tuple:
    """decode_add's trailing tile arguments from `decode_tiles`' dict."""
    return c["LINES"], c["BLOCK_E"], c["num_warps"], c["PREFETCH"]


def _decode_into(out: torch.Tensor, x: torch.Tensor, values: torch.Tensor | None, p: dict, seg) -> None:
    """out (tokens, out_features) += the delta term for decode-shaped batches, reading x (tokens, in);
    values None: packed entries (_packed)."""
    if not _has_work(seg):
        return
    width = out.shape[1]
    c = decode_tiles((width, x.shape[1]))
    one = min(seg.token_counts) == max(seg.token_counts) == 1  # token u is user u's only one
    decode_add(out, x, p["src"], _packed(values, p), p["ptr"], seg.token_offsets, p.get("map"), seg.users,
               p.get("stride", width), [0, width, 0], one, *tile_args(c))


def group_blocks(lines: list[int], lines_per_block: int) -> list[int]:
    """Where each module's line blocks start among a user's blocks in a grouped launch (and, last,
    how many blocks a user has)."""
    starts = [0]
    for n in lines:
        starts.append(starts[-1] + triton.cdiv(n, lines_per_block))
    return starts


@torch.library.custom_op("tkllm::decode_add", mutates_args=("out",))
def decode_add(out: torch.Tensor, x: torch.Tensor, src: torch.Tensor, vals: Optional[torch.Tensor], ptr: torch.Tensor,
               tok_off: torch.Tensor, umap: Optional[torch.Tensor], users: int, stride_ptr: int, group: List[int],
               one_token: bool, lines_per_block: int, block_e: int, num_warps: int, prefetch: bool) -> None:
    """The decode kernel as a torch op (out += the delta term, in place), so a compiled decode
    step keeps it as one opaque call among the ops torch.compile fuses. `group`: (pointer offset
    in a user's run, lines, first output column) of each of 1-3 modules that read x, flat (one
    launch for q/k/v; one module: [0, out's width, 0]). one_token: user u has token u alone (tok_off
    is 0..users; a decode step). vals None: `src` holds packed entries (column and value in one
    int32, _entries)."""
    offs, blocks, layout = _group_launch(group, lines_per_block)
    _csr_decode[(users * blocks,)](
        x, out, src, x if vals is None else vals, ptr, tok_off, tok_off if umap is None else umap, blocks,
        x.stride(0), out.stride(0), stride_ptr, *offs, LINES=lines_per_block, BLOCK_E=block_e,
        MAPPED=umap is not None, PREFETCH=prefetch, PACKED=vals is None, ONE=one_token, **layout, num_warps=num_warps)


@decode_add.register_fake
def _(out, x, src, vals, ptr, tok_off, umap, users, stride_ptr, group, one_token, lines_per_block, block_e, num_warps,
      prefetch) -> None:
    return None


def dense_route(seg, out_features: int, in_features: int) -> bool:
    """Whether this module's batch takes the dense-GEMM route (CONFIG["dense"]); decided at the
    forward and kept on the Segments (one per module and batch), so the backward agrees."""
    if "dense" not in seg._plans:
        c = CONFIG["dense"]
        active = [(t, e) for t, e in zip(seg.token_counts, seg.entry_counts) if t and e]
        seg._plans["dense"] = bool(  # every user with entries has many tokens: no dense Δ for a few rows
            c is not None and active and min(t for t, _ in active) >= c["min_tokens"]
            and sum(e for _, e in active) >= c["min_density"] * len(active) * out_features * in_features)
    return seg._plans["dense"]


def add_forward(out2: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, seg, keep: bool = True):
    """out2 (tokens, out) += each row's delta term, in place. Returns what the backward reads when
    `keep`: x2's transpose (saved instead of x2: the same memory, one transpose fewer), or x2 on
    the dense route."""
    if dense_route(seg, out2.shape[1], x2.shape[1]):
        return segmented_dense.add_forward(out2, x2, values, seg, keep)
    if max(seg.token_counts, default=0) <= DECODE_TOKENS:
        _decode_into(out2, x2.contiguous(), values, _plan_rows(seg, out2.shape[1]), seg)
        return transpose(x2) if keep else None
    xT = transpose(x2)
    _csr_into(out2, xT, values, _plan_rows(seg, out2.shape[1]), seg)
    return xT if keep else None


def backward(dy2: torch.Tensor, xT: torch.Tensor | None, values: torch.Tensor, seg, dx2: torch.Tensor | None,
             need_dv: bool) -> torch.Tensor | None:
    """dx2 (tokens, in) += the delta term of the input gradient, in place (when given); returns
    dv (K,) fp32 when `need_dv`. Both read one transpose of dy (sparse route)."""
    if seg._plans.get("dense"):
        return segmented_dense.backward(dy2, xT, values, seg, dx2, need_dv)
    dyT = transpose(dy2)
    if dx2 is not None:
        _csr_into(dx2, dyT, values, _plan_cols(seg, dx2.shape[1]), seg)
    return sampled_grad_T(dyT, xT, seg, dy2.shape[1]) if need_dv else None
