"""Triton kernels for GSPF selection on a GPU: each pass over the scores is one kernel, where the
torch path spends several (and full-size temporaries) per pass. At tkllm-s scale an account's
selection reads 1.3B fp32 scores (5.2 GB) a pass, so passes, not arithmetic, set its time.

- `zsums`: fp32 sum and sum of squares per block, one read (the z-score's mean and std).
- `weigh_`: s <- (s - mean) / std * tanh|θ|, in place, one read of s and θ and one write.
- `count_and_gather`: per module, how many order keys lie above a bracket and how many inside it,
  plus NaN/inf, in one read; the keys inside are appended to a buffer (with their module), so the
  k-th largest and each module's counts at it come from that buffer, not from more passes.

Each has a torch reference in `selection.py` (what the CPU runs); CI checks the kernels against
them through Triton's interpreter, and the GPU-marked tests on a real GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _tanh_abs(w):
    """tanh|w| in fp32 from exp (no libdevice: Triton's interpreter lacks it). Below 0.25 a
    series (1 - e^-2a loses digits there), above it the exp form: both within ~1e-7 relative."""
    a = tl.abs(w)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * a)
    return tl.where(a < 0.25, series, (1.0 - e) / (1.0 + e))


@triton.jit(do_not_specialize=["n"])
def _zsums_kernel(s_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(s_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + 2 * pid, tl.sum(s, axis=0).to(tl.float64))
    tl.store(out_ptr + 2 * pid + 1, tl.sum(s * s, axis=0).to(tl.float64))


def zsums(s: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares] of a contiguous fp32 tensor as an fp64 device tensor (no host read):
    fp32 within a block of 4,096, fp64 across blocks."""
    flat = s.reshape(-1)
    blocks = triton.cdiv(flat.numel(), BLOCK)
    part = torch.empty(blocks, 2, dtype=torch.float64, device=s.device)
    _zsums_kernel[(blocks,)](flat, part, flat.numel(), BLOCK=BLOCK)
    return part.sum(0)


@triton.jit(do_not_specialize=["n"])
def _weigh_kernel(s_ptr, w_ptr, n, mean, std, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = tl.load(s_ptr + offs, mask=m, other=0.0)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(s_ptr + offs, (s - mean) / std * _tanh_abs(w), mask=m)


def weigh_(s: torch.Tensor, weight: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """s <- (s - mean) / std * tanh|weight|, in place (s contiguous fp32, weight its shape)."""
    w = weight.detach().reshape(-1)
    if not w.is_contiguous():
        w = w.contiguous()
    flat = s.view(-1)
    _weigh_kernel[(triton.cdiv(flat.numel(), BLOCK),)](flat, w, flat.numel(), mean, std, BLOCK=BLOCK)
    return s


# Bracket keys, module index and buffer size vary call to call: specializing on them (value 1,
# divisibility by 16) would compile the kernel anew for each new pattern, seconds each time.
@triton.jit(do_not_specialize=["lo", "hi", "module", "cap"])
def _count_kernel(s_ptr, n, lo, hi, module, counts_ptr, keys_ptr, mods_ptr, total_ptr, cap,
                  BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = tl.load(s_ptr + offs, mask=m, other=0.0)
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # the order key: float order as int32 order
    above = m & (key > hi)
    inside = m & (key >= lo) & (key <= hi)
    bad = m & ((s != s) | (tl.abs(s) == float("inf")))
    tl.atomic_add(counts_ptr + 3 * module, tl.sum(above.to(tl.int64), axis=0))
    n_in = tl.sum(inside.to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + 3 * module + 1, n_in.to(tl.int64))
    tl.atomic_add(counts_ptr + 3 * module + 2, tl.sum(bad.to(tl.int64), axis=0))
    if n_in > 0:
        base = tl.atomic_add(total_ptr, n_in.to(tl.int64))
        pos = base + tl.cumsum(inside.to(tl.int64), axis=0) - 1
        keep = inside & (pos < cap)  # past the buffer: counted, not stored (the caller falls back)
        tl.store(keys_ptr + pos, key, mask=keep)
        tl.store(mods_ptr + pos, tl.zeros_like(key) + module, mask=keep)


def count_and_gather(flats: list[torch.Tensor], lo: int, hi: int, cap: int):
    """Over every module's flat fp32 scores: counts [modules, 3] (keys above `hi`, keys in
    [lo, hi], NaN/inf) and the keys in [lo, hi] with their module index, in no set order, in
    buffers of `cap` (`total`, a one-element tensor, may exceed it: then they are incomplete)."""
    dev = flats[0].device
    counts = torch.zeros(len(flats), 3, dtype=torch.int64, device=dev)
    keys = torch.empty(cap, dtype=torch.int32, device=dev)
    mods = torch.empty(cap, dtype=torch.int32, device=dev)
    total = torch.zeros(1, dtype=torch.int64, device=dev)
    for i, f in enumerate(flats):
        if f.numel():
            _count_kernel[(triton.cdiv(f.numel(), BLOCK),)](f, f.numel(), lo, hi, i, counts, keys, mods, total, cap,
                                                           BLOCK=BLOCK)
    return counts, keys, mods, total
