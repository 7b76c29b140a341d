"""GSPF selection: S̃ = z-score(S) · tanh(|θ|), then the top p% entries, globally or per module.

Global selection never concatenates or sorts all scores: the k-th largest score (as an
order-preserving 32-bit key) is bracketed by a fixed-seed sample and found exactly in one counting
pass, with a radix select (three histogram passes) when the bracket misses; then each module
keeps its entries above it (ties fill up to exactly k).

On a GPU the passes over the scores are Triton kernels (selection_triton.py): one read for the
z-score's sums, one read-and-write that standardizes and weighs, one read that counts and gathers
the bracket. The CPU runs the torch forms here, which the kernels are tested against.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch

try:
    from tkllm_ray.sparse import selection_triton as _triton
except ImportError:  # no triton: the torch path everywhere
    _triton = None

_LAYER = re.compile(r"\.layers\.(\d+)\.")
KERNELS_ON_CPU = False  # tests: run the Triton kernels on the CPU (under TRITON_INTERPRET=1)


@dataclass
class Selection:
    indices: dict[str, torch.Tensor]  # module -> sorted flat int64 positions
    density: float

    @property
    def k(self) -> int:
        return sum(i.numel() for i in self.indices.values())


def _kernels_for(t: torch.Tensor) -> bool:
    """Whether the Triton kernels (selection_triton.py) run on `t`: fp32 on a GPU where Triton is
    installed (and on the CPU through Triton's interpreter when a test sets KERNELS_ON_CPU)."""
    return _triton is not None and t.dtype == torch.float32 and (t.is_cuda or KERNELS_ON_CPU)


def zstats(sensitivity: dict[str, torch.Tensor], scope: str) -> dict[str, tuple[float, float]]:
    """Each module's (mean, std) for its z-score: over all modules (global) or its own, with a
    zero std replaced by 1. fp64 sums on the device, one host read for every module."""
    sums = torch.stack([_sums(t) for t in sensitivity.values()]).tolist()
    counts = [t.numel() for t in sensitivity.values()]
    if scope == "global":
        whole = _mean_std(sum(s for s, _ in sums), sum(ss for _, ss in sums), sum(counts))
        return {n: whole for n in sensitivity}
    return {n: _mean_std(s, ss, c) for n, (s, ss), c in zip(sensitivity, sums, counts)}


def _sums(t: torch.Tensor) -> torch.Tensor:
    if _kernels_for(t) and t.is_contiguous():
        return _triton.zsums(t)  # one read (the torch form reads twice and writes a squared copy)
    return torch.stack([t.sum(dtype=torch.float64), t.square().sum(dtype=torch.float64)])


def _mean_std(s: float, ss: float, n: int) -> tuple[float, float]:
    mean = s / n
    std = max((ss / n - mean * mean), 0.0) ** 0.5
    return mean, std if std > 0 else 1.0


def standardize(sensitivity: dict[str, torch.Tensor], scope: str, inplace: bool = False) -> dict[str, torch.Tensor]:
    """z-score(S), over all modules (global) or per module: the part of the score without weights."""
    stats = zstats(sensitivity, scope)
    return {n: (s if inplace else s.clone()).sub_(stats[n][0]).div_(stats[n][1]) for n, s in sensitivity.items()}


def weigh(s: torch.Tensor, weight: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """s <- (s - mean) / std · tanh(|θ|), in place: a module's score from its sensitivity sums and
    z-score stats (`zstats`), one module at a time (a sharded base gathers each weight once for
    every account selecting, train/zero3.py). On a GPU one kernel pass; the defaults weigh a
    z-score already standardized."""
    if _kernels_for(s) and s.is_contiguous() and weight.device == s.device and weight.numel() == s.numel():
        return _triton.weigh_(s, weight, mean, std)
    if (mean, std) != (0.0, 1.0):
        s.sub_(mean).div_(std)
    return s.mul_(torch.tanh(weight.detach().abs().float().to(s.device)))


def scores(sensitivity: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], scope: str,
           inplace: bool = False) -> dict[str, torch.Tensor]:
    """z-score(S) · tanh(|θ|). `inplace` overwrites the sensitivities (no second full-size copy)."""
    stats = zstats(sensitivity, scope)
    return {n: weigh(s if inplace else s.clone(), weights[n], *stats[n]) for n, s in sensitivity.items()}


def select(sensitivity: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None, density: float = 0.003,
           scope: str = "global", top_layers: int | None = None, inplace: bool = False) -> Selection:
    """Top `density` of the scored entries. `top_layers` keeps the same budget k but confines it
    to the decoder layers the unrestricted selection favours most (plus modules outside the
    layer stack, e.g. lm_head), so backprop stops at the lowest of them: GSPF's cheap mode.
    (With scope per_module the kept modules keep their own budgets; the others get none.)
    `weights=None`: `sensitivity` already holds the scores (standardize and weigh done)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if scope not in ("global", "per_module"):
        raise ValueError(f"scope must be 'global' or 'per_module', got {scope!r}")
    if top_layers is not None and top_layers < 1:
        raise ValueError(f"top_layers must be at least 1, got {top_layers}")
    sc = sensitivity if weights is None else scores(sensitivity, weights, scope, inplace)
    if scope == "per_module":
        _no_nan_in(sc.values())
        idx = {n: _top(s.flatten(), budget(density, s.numel())) for n, s in sc.items()}
        if top_layers is not None:
            kept = _favoured_layers(idx, top_layers)
            idx = {n: i for n, i in idx.items() if layer_of(n) is None or layer_of(n) in kept}
        return Selection(idx, density)
    k = budget(density, sum(s.numel() for s in sc.values()))
    if top_layers is not None:
        kept = _favoured_layers(top_k(sc, k), top_layers)
        sc = {n: s for n, s in sc.items() if layer_of(n) is None or layer_of(n) in kept}
    return Selection(top_k(sc, min(k, sum(s.numel() for s in sc.values()))), density)


def layer_of(name: str) -> int | None:
    """Decoder layer number in a module name (`model.layers.7.mlp.up_proj` -> 7), None outside."""
    m = _LAYER.search(f".{name}.")
    return int(m.group(1)) if m else None


def _favoured_layers(indices: dict[str, torch.Tensor], n: int) -> set[int]:
    per_layer = Counter()
    for name, idx in indices.items():
        if layer_of(name) is not None:
            per_layer[layer_of(name)] += idx.numel()
    # Most entries first; ties go to the deeper layer (less backprop below it).
    return {layer for layer, _ in sorted(per_layer.items(), key=lambda kv: (-kv[1], -kv[0]))[:n]}


def budget(density: float, entries: int) -> int:
    """How many of `entries` a delta at `density` holds: the one rounding rule of every sparse method."""
    return max(1, round(density * entries))


def top_k(sc: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The k highest-scoring entries over all modules: module -> sorted flat int64 positions.
    A few host reads in all, with the threshold's (every module's counts at once; a module's
    positions come out of a fixed-size nonzero, already sorted), not a sync and a sort per module."""
    flats = {n: s.flatten() for n, s in sc.items()}
    found = _gathered_threshold(flats, k)
    if found is not None:  # the GPU's way: threshold and counts from one counting kernel pass
        return _take(flats, k, *found)
    threshold = _kth_largest_key(sc, k)
    counts = torch.stack([torch.stack([_where(f, ">=", threshold).sum(), _where(f, ">", threshold).sum()])
                          for f in flats.values()]).tolist()
    return _take(flats, k, threshold, counts)


def _take(flats: dict[str, torch.Tensor], k: int, threshold: int, counts: list) -> dict[str, torch.Tensor]:
    """Given the k-th largest key and each module's [>=, >] counts at it: entries above the
    threshold, then ties at it in module order, to exactly k in total."""
    left, idx = k - sum(gt for _, gt in counts), {}
    for (n, f), (ge, gt) in zip(flats.items(), counts):
        keep = min(max(left, 0), ge - gt)
        left -= keep
        if keep == ge - gt:  # every tie of this module kept (the usual case: none there)
            idx[n] = torch.nonzero_static(_where(f, ">=", threshold), size=ge).flatten()
        else:
            above = torch.nonzero_static(_where(f, ">", threshold), size=gt).flatten()
            tied = torch.nonzero_static(_where(f, "==", threshold), size=ge - gt).flatten()[:keep]
            idx[n] = torch.sort(torch.cat([above, tied])).values
    return idx


def _gathered_threshold(flats: dict[str, torch.Tensor], k: int) -> tuple[int, list] | None:
    """With the Triton kernels: the k-th largest key and each module's [>=, >] counts at it, from
    the sampled bracket and one kernel pass that counts each module's keys above and inside it and
    gathers those inside (a thousandth of them). None where the kernels do not run or the
    bracket misses (then top_k's general path answers)."""
    values = list(flats.values())
    n = sum(f.numel() for f in values)
    if n <= SAMPLE or not all(_kernels_for(f) and f.is_contiguous() for f in values):
        return None
    hi, lo, band = _bracket(values, k, n)
    cap = int(1.5 * band * n) + 4096  # the bracket holds ~band of the keys; 1.5x: far past its spread
    counts, keys, mods, total = _triton.count_and_gather(values, lo, hi, min(cap, n))
    read = torch.cat([counts.flatten(), total]).tolist()
    above, bad = read[0:-1:3], read[2:-1:3]  # [1::3], the counts inside: `total` holds their sum
    if any(bad):
        raise ValueError(NAN_SCORES)
    need, total = k - sum(above), read[-1]
    if total > keys.numel() or not 1 <= need <= total:  # the buffer overflowed, or the bracket missed
        return None
    keys, mods = keys[:total], mods[:total]
    threshold = int(torch.topk(keys, need).values[-1])
    at = torch.stack([torch.bincount(mods[keys >= threshold], minlength=len(values)),
                      torch.bincount(mods[keys > threshold], minlength=len(values))], 1).tolist()
    return threshold, [[a + ge, a + gt] for a, (ge, gt) in zip(above, at)]


def _order_key(s: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 with the same order (negatives: flip the magnitude bits)."""
    i = s.float().contiguous().view(torch.int32)
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i)


def _key_float(key: int) -> float:
    """The float32 whose order key is `key` (the inverse of _order_key for one value)."""
    bits = key if key >= 0 else key ^ 0x7FFFFFFF
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()


_OPS = {">": torch.gt, ">=": torch.ge, "<=": torch.le, "==": torch.eq}


def _where(s: torch.Tensor, op: str, key: int) -> torch.Tensor:
    """`s op x` in the order of the keys, x the float with order key `key`. Above +0 (key > 0) a float
    comparison is that order for scores without NaN (checked in _kth_largest_key) and costs one
    kernel instead of four; at or below it, the keys keep -0 below +0 as the radix select does."""
    if key > 0:
        return _OPS[op](s if s.dtype == torch.float32 else s.float(), _key_float(key))
    return _OPS[op](_order_key(s), key)


DIGIT_BITS = (11, 11, 10)  # high to low: 2048-bin histograms fit a GPU block's shared memory


SAMPLE = 1 << 20  # scores sampled to bracket the k-th largest


def _bracket(flats: list[torch.Tensor], k: int, n: int) -> tuple[int, int, float]:
    """Order keys (hi, lo) that bracket the k-th largest of the n scores almost surely, from a
    fixed-seed sample (~8 standard deviations of a binomial count either side), and the fraction
    of the scores expected between them."""
    dev = flats[0].device
    gen = torch.Generator(device=dev).manual_seed(0)
    sample = torch.cat([_order_key(f[torch.randint(f.numel(), (max(1, f.numel() * SAMPLE // n),),
                                                   device=dev, generator=gen)]) for f in flats])
    sample = torch.sort(sample, descending=True).values
    rank = k * sample.numel() / n  # where the k-th largest falls in the sample, in expectation
    slack = 8 * rank ** 0.5 + 64
    hi, lo = sample[[max(0, int(rank - slack)), min(sample.numel() - 1, int(rank + slack))]].tolist()
    return hi, lo, (2 * slack + 1) / sample.numel()


def _kth_largest_key(sc: dict[str, torch.Tensor], k: int) -> int:
    """The k-th largest score over all modules, as an order key. Usually one pass: a fixed-seed
    sample of the scores brackets it, one counting pass finds how many lie above the bracket and
    how many inside it, and a top-k over those inside gives it exactly. If the bracket misses
    (rare; checked, never assumed), the radix select below answers instead."""
    n = sum(s.numel() for s in sc.values())
    flats = [s.flatten() for s in sc.values()]
    if n <= SAMPLE:
        _no_nan_in(flats)
        return _radix_kth(sc, k)
    hi, lo, _ = _bracket(flats, k, n)
    # above hi: above the k-th largest, almost surely; lo: below it. One host read for every module's counts.
    # (fp64: counts exact past 2^24, which a float32 stack of them would round; sums without overflow)
    counts = torch.stack([torch.stack([f.sum(dtype=torch.float64), _where(f, ">", hi).sum().double(),
                                       _inside(f, lo, hi).sum().double()]) for f in flats]).tolist()
    _no_nan([c[0] for c in counts])
    need = k - sum(int(c[1]) for c in counts)
    if not 1 <= need <= sum(int(c[2]) for c in counts):
        return _radix_kth(sc, k)
    inside = torch.cat([_order_key(f[torch.nonzero_static(_inside(f, lo, hi), size=int(c[2])).flatten()])
                        for f, c in zip(flats, counts) if c[2]])
    return int(torch.topk(inside, need).values[-1])


def _inside(f: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return _where(f, "<=", hi) & _where(f, ">=", lo)


def _no_nan_in(tensors) -> None:
    """`_no_nan` over the tensors' sums (fp64: no overflow to inf from large finite scores), in one host read."""
    _no_nan(torch.stack([t.sum(dtype=torch.float64) for t in tensors]).tolist())


def _no_nan(sums) -> None:
    """Scores with a NaN have no order to select by: a NaN or infinite sensitivity or weight."""
    if not all(s == s and abs(s) != float("inf") for s in sums):
        raise ValueError(NAN_SCORES)


NAN_SCORES = ("GSPF scores contain NaN or infinite values (a NaN/inf gradient or weight in the warm-up): "
              "no top-k to select")


def _radix_kth(sc: dict[str, torch.Tensor], k: int) -> int:
    """The k-th largest score over all modules, as an order key: a radix select, one histogram
    pass per digit from the high bits down, narrowing to the bin that holds the k-th largest.
    Three passes over the scores, no concatenation or sort of them (memory-flat on a 7B)."""
    prefix, shift, need = 0, 32, k  # the answer's known high bits; `need`-th largest among them
    for bits in DIGIT_BITS:
        shift -= bits
        hist = None
        for scores_ in sc.values():  # keys recomputed per pass: never all modules' keys at once
            unsigned = _order_key(scores_.flatten()).to(torch.int64) + 2**31  # the signed order as 0 .. 2^32 - 1
            digit = (unsigned >> shift) & ((1 << bits) - 1)
            if shift + bits < 32:  # only keys whose higher digits match the prefix so far
                digit = torch.where((unsigned >> (shift + bits)) == prefix, digit, 1 << bits)
            h = torch.bincount(digit, minlength=(1 << bits) + 1)[: 1 << bits]
            hist = h if hist is None else hist + h
        above = hist.flip(0).cumsum(0).flip(0)  # keys with this digit or a larger one
        d = int((above >= need).nonzero().max())  # the largest digit still holding the need-th key
        need -= int(above[d + 1]) if d + 1 < (1 << bits) else 0
        prefix = (prefix << bits) | d
    return prefix - 2**31


def _top(flat: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(flat, k).indices).values.to(torch.int64)

