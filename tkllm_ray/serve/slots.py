"""Decode-time delta layout with one region per engine slot, so a CUDA graph of the decode step stays
valid whatever accounts the slots hold, and a slot changes hands in three device copies.

Rebuilding a mixed batch's inputs (every account's entries concatenated, index plans over them)
whenever a request joins or leaves costs a pass over all of them and a new CUDA graph capture;
with continuous batching that happens nearly every step. Here one pool holds every slot's delta:
slot s owns [s·cap, (s+1)·cap) of the pool's entry arrays (row within its module, input column,
value: 6 bytes an entry below 32k rows and columns; with 16-bit values the column and the value
are one int32, which the decode kernel reads in one load) and [s·P, (s+1)·P) of its line
pointers, where P = Σ over target modules of (lines + 1): module m's pointers for slot s start at
s·P + off[m] and hold absolute positions. An account is laid out once per assignment (all its modules in a few
whole-account ops: `_layout`), then copied into its slot: the tensors a captured graph reads keep
their addresses. A slot without a delta has empty lines. The kernels read slot s's pointers
through `stride` P, and a prefill's requests reach their slots through `map`
(segmented_triton). The capacity is a power of two that grows, and only then are the graphs
recaptured, when an account has more entries than a region holds.

Laying out an account (~0.5 ms of device work for tkllm-s; 30 ms for a batch of 64) is kept for its
next admission, up to `layout_cache_bytes` (LRU; a layout is ~1.2x its delta's bytes): an account
the serving cache holds (a FlatDelta) then takes a copy into its slot. A layout is dropped with
its delta (when the serving cache lets the delta go) or when newer ones need the room.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from types import SimpleNamespace

import torch
from torch import nn

from tkllm_ray.sparse.delta_op import split_indices
from tkllm_ray.sparse.delta_store import FlatDelta


class SlotDeltas:
    def __init__(self, slots: int, linears: dict[str, nn.Module], dtype: torch.dtype, device: torch.device,
                 layout_cache_bytes: int = 0, wide_pointers: bool = False, pack: bool = True):
        self.slots, self.dtype, self.device = slots, dtype, torch.device(device)
        self.layout_cache_bytes, self.layout_bytes = layout_cache_bytes, 0
        self.wide_pointers = wide_pointers  # int64 line pointers even where int32 would do (to compare)
        self._laid: OrderedDict[int, tuple] = OrderedDict()  # id(delta) -> (weakref to it, layout, bytes)
        self.stats = {"layouts": 0, "layout_hits": 0}
        # name order, as delta files and the serving cache store modules: a cached account's flat
        # buffers are already in the pool's order (`_layout` takes them without concatenating)
        self.names = sorted(linears)
        self.module_index = {n: m for m, n in enumerate(self.names)}
        self.shapes = {n: (m.weight.shape[0], m.weight.shape[1]) for n, m in linears.items()}
        lines = torch.tensor([self.shapes[n][0] + 1 for n in self.names])
        self.offsets = [0, *lines.cumsum(0).tolist()]  # module m's pointers: [off[m], off[m + 1]) of a slot's P
        self.P = self.offsets[-1]
        self.line_base = torch.tensor(self.offsets[:-1], device=self.device)
        self.in_features = torch.tensor([self.shapes[n][1] for n in self.names], device=self.device)
        small = max(max(r, c) for r, c in self.shapes.values()) < 2**15
        self.index_dtype = torch.int16 if small else torch.int32
        # column and value in one int32 (segmented_triton._entries) where both fit in 16 bits
        self.packed = pack and small and dtype in (torch.bfloat16, torch.float16)
        self.held: list[dict | None] = [None] * slots  # the delta each slot holds (compared by identity)
        self.tok_off = torch.arange(slots + 1, dtype=torch.int64, device=self.device)
        self.empty_slot = slots  # a slot index with no entries in any module, for a view's rows (`view`)
        self._groups: dict[tuple, tuple] = {}  # group_add's launch metadata per group of modules
        self._alloc(1)

    def _alloc(self, cap: int) -> None:
        self.cap = cap
        self.rows = torch.zeros(self.slots * cap, dtype=self.index_dtype, device=self.device)
        # what the kernels read for an entry: its packed column and value (vals None), else its column
        self.src = torch.zeros(self.slots * cap, dtype=torch.int32 if self.packed else self.index_dtype,
                               device=self.device)
        self.vals = None if self.packed else torch.zeros(self.slots * cap, dtype=self.dtype, device=self.device)
        # absolute line positions: int32 while the pool's entries fit (the kernels read a line's
        # bounds for every line of every slot each step: int64 made them ~1/4 of a decode's bytes)
        # (with room for a chunk's positions past the last entry, which the kernels compute in the
        # pointers' type)
        wide = self.wide_pointers or self.slots * cap >= 2**31 - 2**16
        self.ptr = (torch.arange(self.slots, device=self.device, dtype=torch.int64 if wide else torch.int32)
                    * cap).repeat_interleave(self.P)
        # and one run more, every line empty: `empty_slot`, where a prefill graph's padding rows look;
        # a slot without a delta copies it (then adds its region's start)
        self.ptr = torch.cat([self.ptr, torch.zeros(self.P, dtype=self.ptr.dtype, device=self.device)])
        self._no_lines = self.ptr[self.slots * self.P :]
        self.segs = {n: self._segments(n, self.slots, 1, self.tok_off, None) for n in self.names}

    def _segments(self, name: str, users: int, tokens: int, tok_off: torch.Tensor, umap: torch.Tensor | None):
        """What the segmented op's GPU path reads for module `name` (a Segments' fields and its
        cached rows plan) over `users` rows groups of `tokens` tokens, group u in slot umap[u]. The
        pool's entries are laid out per slot, not per user: always the sparse kernels' route."""
        m = self.module_index[name]
        plan = {"src": self.src, "dst": self.rows, "perm": None, "ptr": self.ptr[self.offsets[m]:], "stride": self.P,
                "map": umap, "packed": self.packed}
        return SimpleNamespace(users=users, token_counts=(tokens,) * users, token_offsets=tok_off, rows=self.rows,
                               _plans={f"rows{self.shapes[name][0]}": plan, "dense": False})

    @property
    def active(self) -> bool:
        return any(d is not None for d in self.held)

    def assign(self, deltas: list[dict | None]) -> bool:
        """Make slot s hold deltas[s] (a device delta {module: (sorted flat indices, values)}, or
        None). Only slots whose delta changed are rewritten. Returns True when the pool had to grow
        (its tensors are new: graphs that read the old ones are stale)."""
        if len(deltas) != self.slots:
            raise ValueError(f"one delta (or None) per slot: {self.slots} slots, {len(deltas)} given")
        return self._place(dict(enumerate(deltas)))

    def prefill(self, slots: list[int], deltas: list[dict | None]) -> tuple["_PrefillView", bool]:
        """Put new requests' deltas into their slots; returns the context their prefill reads
        (request i's rows -> slot slots[i]) and whether the pool grew (as `assign`)."""
        grown = self._place(dict(zip(slots, deltas)))
        return self.view(torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)), grown

    def view(self, umap: torch.Tensor) -> "_PrefillView":
        """The context of a prefill whose request i reads slot umap[i]'s delta (a device tensor;
        `empty_slot`: none)."""
        return _PrefillView(self, umap)

    def _place(self, wanted: dict[int, dict | None]) -> bool:
        # only deltas not yet in a slot can need more room (the held ones fit): a decode step with
        # no change costs a scan of identities, not of every module's entry count
        changed = [d for s, d in wanted.items() if d is not None and d is not self.held[s]]
        grown = max((self._entries(d) for d in changed), default=0) > self.cap
        laid: dict[int, tuple] = {}  # one layout an account, however many slots it takes
        need = max((self._entries(d) for d in [*changed, *self.held] if d is not None), default=0) if grown else 0
        writes = []
        if grown:  # every region is new (and empty): rewrite what the slots hold, then place
            self._alloc(1 << (need - 1).bit_length())
            writes = [(s, d) for s, d in enumerate(self.held) if s not in wanted]
        try:
            self._write(writes + [(s, d) for s, d in wanted.items() if grown or d is not self.held[s]], laid)
        except BaseException:
            if grown:  # (e.g. out of memory laying an account out) the new regions are all empty
                self.held = [None] * self.slots
            raise
        return grown

    def _entries(self, delta: dict) -> int:
        if isinstance(delta, FlatDelta):  # from its layout: no per-module views made
            return delta.entries(self.shapes)
        return sum(p[0].numel() for n, p in delta.items() if n in self.shapes)

    @torch.no_grad()
    def _layout(self, delta: dict) -> tuple:
        """One account's (rows, columns or packed entries, values or None when packed, line pointers
        relative to its region), all modules in a few whole-account ops: entries in module order,
        each module's sorted by flat index (so by row); a line's run starts where the entries of
        lower (module, row) keys end. A cached account (FlatDelta in the pool's module order) is
        read from its two flat buffers as they are: about ten kernels an account, where gathering
        2 x 169 pieces cost ~3.7 ms of launches."""
        flat = self._flat(delta)
        if flat is not None:
            mods, sizes, idx, vals = flat
        else:
            parts = [(m, delta[n]) for m, n in enumerate(self.names) if n in delta and delta[n][0].numel()]
            mods, sizes = [m for m, _ in parts], [p[0].numel() for _, p in parts]
            if parts:
                idx = torch.cat([p[0].to(self.device, torch.int64) for _, p in parts])
                vals = torch.cat([p[1].to(self.device, self.dtype) for _, p in parts])
        if not sum(sizes):
            return None, None, None, None
        idx, vals = idx.to(self.device, torch.int64), vals.to(self.device, self.dtype)
        module = torch.repeat_interleave(torch.tensor(mods).to(self.device, non_blocking=True),
                                         torch.tensor(sizes).to(self.device, non_blocking=True), output_size=sum(sizes))
        rows, cols = split_indices(idx, self.in_features[module])
        ptr = torch.searchsorted(rows + self.line_base[module], torch.arange(self.P, device=self.device),
                                 out_int32=True)
        rows, cols = rows.to(self.index_dtype), cols.to(self.index_dtype)
        if self.packed:  # the value's 16 bits above the column's
            return rows, (vals.view(torch.int16).to(torch.int32) << 16) | (cols.to(torch.int32) & 0xFFFF), None, ptr
        return rows, cols, vals, ptr

    def _laid_out(self, delta: dict) -> tuple:
        """`_layout(delta)`, from the layout cache when it holds this very delta object."""
        key = id(delta)
        held = self._laid.get(key)
        if held is not None and held[0]() is delta:
            self._laid.move_to_end(key)
            self.stats["layout_hits"] += 1
            return held[1]
        self.stats["layouts"] += 1
        lay = self._layout(delta)
        size = sum(t.numel() * t.element_size() for t in lay if t is not None)
        if isinstance(delta, FlatDelta) and size <= self.layout_cache_bytes:  # a plain dict has no weakref
            self._forget(key)
            while self.layout_bytes + size > self.layout_cache_bytes:
                self._forget(next(iter(self._laid)))
            ref = weakref.ref(delta, lambda r, k=key: self._laid.get(k, (None,))[0] is r and self._forget(k))
            self._laid[key] = (ref, lay, size)
            self.layout_bytes += size
        return lay

    def clear_layouts(self) -> None:
        """Drop every kept layout (their next admission lays them out again)."""
        self._laid.clear()
        self.layout_bytes = 0

    def _forget(self, key: int) -> None:
        held = self._laid.pop(key, None)
        if held is not None:
            self.layout_bytes -= held[2]

    def _flat(self, delta: dict):
        """(module positions, entry counts, flat indices, flat values) when `delta` is flat with its
        modules all in the pool, in the pool's order; else None (the general path gathers)."""
        if not isinstance(delta, FlatDelta):
            return None
        pos = [self.module_index.get(n) for n, _ in delta.layout]
        if None in pos or any(a >= b for a, b in zip(pos, pos[1:])):
            return None
        return pos, [k for _, k in delta.layout], *delta.flat

    @torch.no_grad()
    def _write(self, writes: list[tuple[int, dict | None]], laid: dict) -> None:
        """Slot s's region := delta d's layout, for each (s, d) of `writes` (None: no entries). The
        copies of all of them go as a few multi-tensor ops: a full batch's 64 admissions took
        ~5 ms of launches as four ops a slot. Every layout is made before any copy, and a slot
        counts as holding its delta only once the copies are issued."""
        pairs: dict[str, tuple[list, list]] = {k: ([], []) for k in ("rows", "src", "vals", "ptr")}
        ptrs, starts = [], []
        for _, delta in writes:
            if delta is not None and id(delta) not in laid:
                laid[id(delta)] = self._laid_out(delta)
        for slot, delta in writes:
            start = slot * self.cap
            lay = (None,) * 4 if delta is None else laid[id(delta)]
            out = self.ptr[slot * self.P : (slot + 1) * self.P]
            if lay[0] is None:
                pairs["ptr"][0].append(out)  # empty lines: every pointer at the region's start
                pairs["ptr"][1].append(self._no_lines)
            else:
                for key, part in zip(("rows", "src", "vals", "ptr"), lay):
                    if part is not None:
                        dst = out if key == "ptr" else getattr(self, key)[start : start + part.numel()]
                        pairs[key][0].append(dst)
                        pairs[key][1].append(part)
            ptrs.append(out)
            starts.append(start)
        for dst, src in pairs.values():
            if dst:
                torch._foreach_copy_(dst, src)
        if ptrs:  # int32 relative positions, then absolute (int32 unless the pool is past 2^31 entries)
            torch._foreach_add_(ptrs, starts)
        for slot, delta in writes:
            self.held[slot] = delta

    def add_group(self, members: tuple[tuple[str, int], ...]) -> tuple:
        """Register 1-3 pool modules that read the same input (q/k/v, gate/up) for `group_add`, each
        (name, its first column in the group's stacked output), with the decode tiles CONFIG has for
        them now; returns the group's key (one per members and tiles)."""
        from tkllm_ray.sparse.segmented_triton import decode_tiles

        if not 1 <= len(members) <= 3:
            raise ValueError(f"a group holds 1 to 3 modules (one decode launch), not {len(members)}")
        lines = [self.shapes[n][0] for n, _ in members]
        din = self.shapes[members[0][0]][1]
        if any(self.shapes[n][1] != din for n, _ in members):
            raise ValueError(f"a group's modules read one input: {[n for n, _ in members]} do not")
        c = decode_tiles((sum(lines), din), (lines[0], din))
        key = (members, tuple(sorted(c.items())))
        if key not in self._groups:
            # (pointer offset in a slot's run, lines, first output column) per module, for the kernel
            layout = [v for (n, col), k in zip(members, lines) for v in (self.offsets[self.module_index[n]], k, col)]
            self._groups[key] = (layout, c)
        return key

    def group_add(self, out: torch.Tensor, x: torch.Tensor, group: tuple) -> None:
        """Decode: out[:, col : col + lines of m] += each slot row's delta term of module m, for
        every (m, col) of the group (`add_group`), reading x (slots, in): one kernel launch."""
        from tkllm_ray.sparse.segmented_triton import decode_add, tile_args

        layout, c = self._groups[group]
        decode_add(out, x.contiguous(), self.src, self.vals, self.ptr, self.tok_off, None, self.slots, self.P, layout,
                   True, *tile_args(c))  # slot s's one token is row s

    def module_inputs(self, name: str, lin: nn.Module):
        """(segments, values) for the decode step: every module, always (a captured graph must launch
        the same kernels whatever the slots hold). Values None: the entries carry them (packed)."""
        seg = self.segs.get(name)
        return (None, None) if seg is None else (seg, self.vals)


class _PrefillView:
    """The batch context of a prefill whose request i owns rows [i·tokens, (i+1)·tokens) and slot
    slots[i] (the engine sets `tokens`: the padded prompt width, then 1 for the last positions)."""

    def __init__(self, table: SlotDeltas, umap: torch.Tensor):
        self.table, self.umap, self.tokens = table, umap, 1
        self._offsets: dict[int, torch.Tensor] = {}

    def module_inputs(self, name: str, lin: nn.Module):
        if name not in self.table.shapes:
            return None, None
        seg = self.table._segments(name, self.umap.numel(), self.tokens, self._token_offsets(), self.umap)
        return seg, self.table.vals

    def _token_offsets(self) -> torch.Tensor:
        if self.tokens not in self._offsets:
            self._offsets[self.tokens] = torch.arange(self.umap.numel() + 1, device=self.table.device) * self.tokens
        return self._offsets[self.tokens]

    def group_add(self, out: torch.Tensor, x: torch.Tensor, group: tuple) -> None:
        """SlotDeltas.group_add for the prefill's rows (request i's `tokens` rows through slot
        slots[i]): one transpose of x and one launch for the group's modules, where each module
        apart transposed x again and launched once."""
        from tkllm_ray.sparse.segmented_triton import DECODE_TOKENS, csr_add, decode_add, tile_args, transpose

        t, n = self.table, self.umap.numel()
        layout, c = t._groups[group]
        if self.tokens <= DECODE_TOKENS:  # a few tokens a request: the streaming kernel, as add_forward picks
            decode_add(out, x.contiguous(), t.src, t.vals, t.ptr, self._token_offsets(), self.umap, n, t.P, layout,
                       self.tokens == 1, *tile_args(c))
        else:
            csr_add(out, transpose(x), t.src, t.rows, t.vals, t.ptr, self._token_offsets(), self.umap, n, t.P, layout,
                    (self.tokens,) * n)
