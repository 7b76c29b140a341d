"""Decode-time delta layout with one region per engine slot, so a CUDA graph of the decode step stays
valid whatever accounts the slots hold.

Rebuilding a mixed batch's inputs (every account's entries concatenated, index plans over them)
whenever a request joins or leaves costs a pass over all of them and a new CUDA graph capture;
with continuous batching that happens nearly every step. Here each target module owns fixed
buffers: slot s's entries (output row, input column, value) live at [s·cap, s·cap + k) and its line
pointers (lines + 1 of them, absolute positions) at ptr[s·(lines + 1):]. Giving a slot another
account rewrites only that slot's region, in place: the tensors a captured graph reads keep their
addresses. A slot without a delta has empty lines. The decode kernel reads each slot's pointers
through `stride` (segmented_triton._csr_decode). Capacities are powers of two that grow (and
then, only then, the graphs are recaptured) when an account has more entries in a module.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from tkllm_ray.sparse.delta_op import split_indices


class SlotDeltas:
    def __init__(self, slots: int, linears: dict[str, nn.Module], dtype: torch.dtype, device: torch.device):
        self.slots, self.dtype, self.device = slots, dtype, torch.device(device)
        self.shapes = {n: (m.weight.shape[0], m.weight.shape[1]) for n, m in linears.items()}
        self.held: list[dict | None] = [None] * slots  # the delta each slot holds (compared by identity)
        self.tokens = 1  # decode: one row per slot (the engine's context protocol)
        self.bufs: dict[str, SimpleNamespace] = {}
        tok_off = torch.arange(slots + 1, dtype=torch.int64, device=self.device)
        for name in self.shapes:
            self.bufs[name] = self._alloc(name, 1, tok_off)

    def _alloc(self, name: str, cap: int, tok_off: torch.Tensor) -> SimpleNamespace:
        lines = self.shapes[name][0]
        b = SimpleNamespace(cap=cap, rows=torch.zeros(self.slots * cap, dtype=torch.int32, device=self.device),
                            cols=torch.zeros(self.slots * cap, dtype=torch.int32, device=self.device),
                            vals=torch.zeros(self.slots * cap, dtype=self.dtype, device=self.device),
                            ptr=(torch.arange(self.slots, device=self.device) * cap).repeat_interleave(lines + 1))
        # What the segmented op's GPU path reads (a Segments' fields and its cached rows plan).
        b.seg = SimpleNamespace(users=self.slots, token_counts=(1,) * self.slots, token_offsets=tok_off,
                                rows=b.rows, cols=b.cols,
                                _plans={f"rows{lines}": {"src": b.cols, "dst": b.rows, "perm": None, "ptr": b.ptr,
                                                         "stride": lines + 1}})
        return b

    @property
    def active(self) -> bool:
        return any(d is not None for d in self.held)

    def assign(self, deltas: list[dict | None]) -> bool:
        """Make slot s hold deltas[s] (a device delta {module: (sorted flat indices, values)}, or
        None). Only slots whose delta changed are rewritten. Returns True when a buffer had to grow
        (its tensors are new: graphs that read the old ones are stale)."""
        if len(deltas) != self.slots:
            raise ValueError(f"one delta (or None) per slot: {self.slots} slots, {len(deltas)} given")
        grown = False
        for name in self.shapes:
            need = max((d[name][0].numel() for d in deltas if d is not None and name in d), default=0)
            if need > self.bufs[name].cap:
                tok_off = self.bufs[name].seg.token_offsets
                self.bufs[name] = self._alloc(name, 1 << (need - 1).bit_length(), tok_off)
                grown = True
        for s, d in enumerate(deltas):
            if grown or d is not self.held[s]:  # grown: every region is new (and empty)
                self._write(s, d)
        return grown

    @torch.no_grad()
    def _write(self, slot: int, delta: dict | None) -> None:
        for name, (lines, cols) in self.shapes.items():
            b = self.bufs[name]
            start, ptr = slot * b.cap, b.ptr[slot * (lines + 1) : (slot + 1) * (lines + 1)]
            part = delta.get(name) if delta is not None else None
            if part is None or part[0].numel() == 0:
                ptr.fill_(start)
                continue
            idx, vals = part
            k = idx.numel()
            rows, cc = split_indices(idx.to(self.device, torch.int64), cols)
            b.rows[start : start + k] = rows
            b.cols[start : start + k] = cc
            b.vals[start : start + k] = vals.to(self.device, self.dtype)
            # entries are sorted by flat index, so by row: line l's run starts at searchsorted(rows, l)
            torch.searchsorted(rows, torch.arange(lines + 1, device=self.device), out=ptr)
            ptr += start
        self.held[slot] = delta

    def module_inputs(self, name: str, lin: nn.Module):
        """(segments, values) for the decode step: every module, always (a captured graph must launch
        the same kernels whatever the slots hold)."""
        b = self.bufs.get(name)
        return (None, None) if b is None else (b.seg, b.vals)
