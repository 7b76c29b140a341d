"""One launch that scatters a whole delta into many weight tensors, and one that restores them.

Serving merges a one-account batch's delta into the base weights (serve/engine.py) and restores
them exactly when another account joins. Module by module (model.AppliedDelta's torch path) that
is ~6 small ops for each of tkllm-s's 169 linears: ~1,000 launches, ~11 ms on an H100 for 3.6M
entries whose bytes take microseconds to move. Here each entry finds its module's weight through a
table of the weights' addresses, so the whole delta is one gather-and-add launch (the originals
saved) and the restore one scatter. The sums are add_rounded's: base + v in fp32, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _scatter(addrs, mods, idx, vals, saved, n, RESTORE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    # entry i's element: its module's weight (an address from the table) + its flat index there
    base = tl.load(addrs + tl.load(mods + i, mask=m, other=0), mask=m, other=0)
    p = base.to(tl.pointer_type(saved.dtype.element_ty)) + tl.load(idx + i, mask=m, other=0)
    if RESTORE:
        tl.store(p, tl.load(saved + i, mask=m), mask=m)
    else:
        w = tl.load(p, mask=m)
        tl.store(saved + i, w, mask=m)
        v = tl.load(vals + i, mask=m, other=0.0)
        tl.store(p, (w.to(tl.float32) + v.to(tl.float32)).to(w.dtype), mask=m)


class MergedDelta:
    """A delta scattered into `weights` (one per module, in the delta's module order) in place:
    W[idx] = round(W[idx] + v); `restore()` writes the saved originals back (bit-exact)."""

    def __init__(self, weights: list[torch.Tensor], idx: torch.Tensor, vals: torch.Tensor, counts: list[int]):
        dev = weights[0].device
        self.addrs = torch.tensor([w.data_ptr() for w in weights], dtype=torch.int64).to(dev, non_blocking=True)
        self.mods = torch.repeat_interleave(torch.arange(len(weights), device=dev, dtype=torch.int32),
                                            torch.tensor(counts).to(dev, non_blocking=True), output_size=sum(counts))
        self.idx = idx.to(dev) if idx.dtype in (torch.int32, torch.int64) else idx.to(dev, torch.int64)
        self.saved = torch.empty(self.idx.numel(), dtype=weights[0].dtype, device=dev)
        self._launch(vals.to(dev), False)

    def restore(self) -> None:
        if self.saved is not None:
            self._launch(self.saved, True)
            self.saved = None

    def _launch(self, vals: torch.Tensor, restore: bool) -> None:
        n = self.idx.numel()
        if n:
            _scatter[(triton.cdiv(n, BLOCK),)](self.addrs, self.mods, self.idx, vals, self.saved, n, RESTORE=restore,
                                              BLOCK=BLOCK)


def mergeable(weights: list[torch.Tensor]) -> bool:
    """Whether MergedDelta can take these weights: contiguous, one device and a dtype it rounds
    as add_rounded does (16-bit or fp32), no two overlapping in memory (a tied weight, or a stack
    and one of its rows' views: the torch path applies such modules' entries one after the other)."""
    if not weights:
        return False
    w0 = weights[0]
    if not (all(w.is_contiguous() and w.device == w0.device and w.dtype == w0.dtype for w in weights)
            and w0.dtype in (torch.bfloat16, torch.float16, torch.float32)):
        return False
    spans = sorted((w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()) for w in weights)
    return all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
