"""Generation for requests of many accounts on one shared base: continuous batching over a static
KV cache, each row through its own account's W + Δ (the segmented op, via the mixed linears, as in
packed training). Greedy output for an account equals the base with that account's delta merged
in, and a request's tokens do not depend on what else runs beside it (tested).

- The KV cache is allocated once: per layer, K and V of shape (slots + 1, kv_heads, max_len,
  head_dim), the last row for a prefill graph's padding rows. A request holds one slot from
  admission to its last token; no cache grows or is copied.
- Each `step()` admits waiting requests into free slots (one prefill over just their prompts,
  right-padded: causal attention never reads a pad; on a GPU a CUDA graph replay per bucket of
  batch size and prompt width, `prefill_bucket`), then runs one decode step over every slot:
  the same shapes each step. Attention reads the cache up to the longest live position rounded up
  to `bucket`, not the whole max_len.
- Sampling is batched (one argmax for all rows, draws only for sampling rows) with one host copy
  per step. Requests join and leave between steps; `stream` runs a fixed list to completion.
- A batch of one account only (its prefill when no other account is live, and its decode steps)
  runs the plain base with that account's delta scattered into the weights (restored bit-exactly
  before anything else runs; one launch each way on a GPU): no delta term at all. In
  fp32 this gives the mixed path's tokens (tested); in bf16 the roundings differ (W + Δ rounded
  once vs the delta term added in fp32), as batch composition changes rounding in any engine.
Llama-family bases (the presets and SmolLM2): the engine runs their layers itself, reusing the
model's own norms, rotary embedding and (mixed) linears.
"""

from __future__ import annotations

import gc
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from tkllm_ray.serve.prefill_graphs import PrefillGraph, prefill_bucket
from tkllm_ray.serve.request import GenRequest, append_token, sample
from tkllm_ray.serve.slots import SlotDeltas
from tkllm_ray.serve.stacked import Stack, layer_stacks
from tkllm_ray.sparse.delta_store import Delta
from tkllm_ray.sparse.mixed import rows_inputs, swap_in
from tkllm_ray.sparse.segmented import add_delta_term
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.sensitivity import target_linears


class _RowDeltas:
    """The batch context the mixed linears read: request i owns rows [i·L, (i+1)·L) of the
    flattened activations (L = `tokens`: the padded prompt length in a prefill, else 1)."""

    def __init__(self, deltas: list[Delta | None], dtype: torch.dtype, adapters: list | None = None):
        self.deltas, self.dtype = deltas, dtype
        # no account's delta: every module's inputs are (None, None), read without the dict (a
        # compiled decode step would guard on the dict's keys and recompile once they change)
        self.any = any(d is not None for d in deltas)
        # (request index, Adapters) of the requests whose account has token-selective adapters
        self.adapters = [(i, a) for i, a in enumerate(adapters or []) if a is not None]
        self.tokens = 1
        self._inputs: dict[tuple[str, int], tuple] = {}

    def module_inputs(self, name: str, lin: nn.Linear):
        if not self.any:
            return None, None
        key = (name, self.tokens)
        if key not in self._inputs:  # built once per slot assignment: every decode step reuses it
            parts = [d.get(name) if d is not None else None for d in self.deltas]
            self._inputs[key] = rows_inputs(parts, [self.tokens] * len(self.deltas), lin, self.dtype)
        return self._inputs[key]


@dataclass
class _Projection:
    """A stack of linears (serve/stacked.py) as the engine runs it, with the member modules' group
    in the slot pool (None: none of them is in it, or no pool)."""
    stack: Stack
    group: tuple | None = None


@dataclass
class _Live:
    rid: int
    req: GenRequest
    gen: torch.Generator | None
    out: list[int] = field(default_factory=list)


class DeltaBatchEngine:
    def __init__(self, model: nn.Module, pad_id: int = 0, target_modules: list[str] | None = None,
                 slots: int = 64, max_len: int | None = None, bucket: int = 64, cuda_graphs: bool = True,
                 merge_single: bool = True, compile: bool = False, stack: bool = True, layout_cache_mb: int = 2048,
                 freeze_gc: bool = False, prefill_graph_tokens: int = 4096):
        self.model, self.pad_id, self.bucket = model.eval(), pad_id, bucket
        self.freeze_gc, self._warm = freeze_gc, set()  # see _warmed_up
        # A decode batch of one account only runs on the base with its delta scattered into the
        # weights (restored exactly when another account joins): the plain base step, no delta term.
        self.merge_single, self._merged = merge_single, None
        for p in model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        self.device, self.dtype = next(model.parameters()).device, next(model.parameters()).dtype
        self.slots, self.max_len = slots, max_len or cfg.max_position_embeddings
        self.layers = model.model.layers
        attn = self.layers[0].self_attn
        # one row more than slots: where a graphed prefill's padding rows write (_prefill_logits)
        shape = (slots + 1, cfg.num_key_value_heads, self.max_len, attn.head_dim)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.pos = [0] * slots  # tokens cached per slot = the next token's position
        self.live: list[_Live | None] = [None] * slots
        self.waiting: deque[_Live] = deque()
        self._next_rid = 0
        self.ctx = None  # what the mixed linears read: _RowDeltas, the slot pool, or a prefill's view of it
        self._decode_ctx = None  # CPU: rebuilt when the slot assignment changes
        # CUDA graphs of the decode step, per attention span: one set for base-only batches, one
        # for batches with deltas (read from the slot regions; dropped only when a region grows).
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple, tuple] = {}
        # Prefills of at most prefill_graph_tokens (padded) tokens replay CUDA graphs too, one per
        # (kind, bucket): eager, a 64-account prefill was bound by its ~1,100 launches (46 ms for
        # ~24 ms of device work on an H100). Larger ones are bound by the device: eager. The graphs
        # share one memory pool (one replays at a time, its logits read before the next).
        self.prefill_graph_tokens = prefill_graph_tokens if self.cuda_graphs else 0
        self._prefill_graphs: dict[tuple, PrefillGraph] = {}
        self._prefill_capture_failures = 0
        self._prefill_pool = torch.cuda.graph_pool_handle() if self.prefill_graph_tokens else None
        # torch.compile fuses the step's many small ops (norms, rotary, cache writes) before the graph
        # captures it; the delta kernel stays one opaque op (segmented_triton.decode_add).
        self._compiled = torch.compile(self._decode_step, dynamic=False) if compile else None
        self.stats = {"graph_captures": 0, "merges": 0}
        self._static = (torch.zeros(slots, dtype=torch.long, device=self.device),
                        torch.zeros(slots, dtype=torch.long, device=self.device))
        # q/k/v and gate/up as one GEMM (and one delta launch) each (serve/stacked.py)
        stacks = layer_stacks(model) if stack else [(None, None)] * len(self.layers)
        linears = target_linears(model, target_modules)
        # On a GPU, decode reads the deltas from per-slot regions (serve/slots.py): a request joining
        # or leaving rewrites its slot only, and the captured graphs stay valid.
        # (its layouts of recent accounts kept for their next admission, up to layout_cache_mb)
        self._table = SlotDeltas(slots, linears, self.dtype, self.device, layout_cache_mb << 20) \
            if self.device.type == "cuda" else None
        self._no_deltas = _RowDeltas([None] * slots, self.dtype)
        swap_in(model, linears, self)
        self._stacks = [tuple(None if st is None else self._projection(st) for st in pair) for pair in stacks]

    # ---- requests in, tokens out -------------------------------------------------------------
    def submit(self, req: GenRequest) -> int:
        """Queue a request; returns its id (the first element of its `step()` updates)."""
        if not req.prompt:
            raise ValueError("every request needs a non-empty prompt")
        if len(req.prompt) + max(req.max_tokens, 0) > self.max_len:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                             f"engine's max_len {self.max_len}")
        rid, self._next_rid = self._next_rid, self._next_rid + 1
        gen = torch.Generator(device=self.device).manual_seed(req.seed) if req.seed is not None else None
        self.waiting.append(_Live(rid, req, gen))
        return rid

    def abort(self) -> None:
        """Drop every queued and live request (after a failed step: their callers get the error)."""
        self.waiting.clear()
        self.live, self.pos = [None] * self.slots, [0] * self.slots
        self._decode_ctx = None
        self._merge(None)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.live)

    @torch.no_grad()
    def step(self) -> list[tuple[int, list[int], bool]]:
        """Admit what fits, decode one token for every live request: (request id, its tokens so
        far, finished) for each request that changed. A stop sequence is removed when it
        completes, so a consumer that streams text holds back tokens that could start one."""
        updates: list[tuple[int, list[int], bool]] = []
        self._admit(updates)
        if any(s is not None for s in self.live):
            self._decode(updates)
        return updates

    def stream(self, requests: list[GenRequest]) -> Iterator[list[tuple[int, list[int], bool]]]:
        """Run `requests` to completion (beside whatever else is queued): per step, (index into
        `requests`, tokens so far, finished) for each that changed."""
        index = {self.submit(r): i for i, r in enumerate(requests)}
        left = set(index)
        while left:
            updates = self.step()
            left -= {rid for rid, _, done in updates if done}
            mine = [(index[rid], toks, done) for rid, toks, done in updates if rid in index]
            if mine:
                yield mine

    def generate(self, requests: list[GenRequest]) -> list[list[int]]:
        """New tokens per request (stop sequences and EOS not included)."""
        out = [[] for _ in requests]
        for updates in self.stream(requests):
            for i, tokens, _ in updates:
                out[i] = tokens
        return out

    # ---- scheduling ------------------------------------------------------------------------
    def _admit(self, updates: list) -> None:
        new: list[tuple[int, _Live]] = []
        free = [s for s in range(self.slots) if self.live[s] is None]
        while self.waiting and (free or self.waiting[0].req.max_tokens <= 0):
            lv = self.waiting.popleft()
            if lv.req.max_tokens <= 0:
                updates.append((lv.rid, [], True))
                continue
            new.append((free.pop(0), lv))
        if new:
            width = max(len(lv.req.prompt) for _, lv in new)
            if self.device.type == "cuda":  # right-padded to a multiple of 16 tokens: the delta kernel's
                width = min(-(-width // 16) * 16, self.max_len)  # gathers of a prompt's tokens are then aligned
            ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
            for i, (_, lv) in enumerate(new):
                ids[i, : len(lv.req.prompt)] = torch.tensor(lv.req.prompt)
            lens = torch.tensor([len(lv.req.prompt) for _, lv in new])
            slots = [s for s, _ in new]
            deltas = [lv.req.delta for _, lv in new]
            adapters = [lv.req.adapters for _, lv in new]
            kind = "base"  # what a prefill graph of theirs runs: no delta term, or the pool's ("deltas")
            if any(a is not None for a in adapters):  # token-selective accounts: the eager row path
                self._merge(None)
                ctx, kind = _RowDeltas(deltas, self.dtype, adapters), None
            elif self.merge_single and self._merged is not None and all(d is self._merged[0] for d in deltas):
                ctx = _RowDeltas([None] * len(new), self.dtype)  # their account is merged in already
            elif self._sole(deltas) is not None:  # every row will be one account's: merged in now, where
                self._merge(deltas[0])  # the first decode step would merge it after a prefill with deltas
                ctx = _RowDeltas([None] * len(new), self.dtype)
            else:
                self._merge(None)
                if self._table is not None and any(d is not None for d in deltas):
                    ctx, grown = self._table.prefill(slots, deltas)
                    kind = "deltas"
                    if grown:
                        self._drop_delta_graphs()
                else:
                    ctx = _RowDeltas(deltas, self.dtype)
                    kind = None if ctx.any else "base"
            logits = self._prefill_logits(ids, slots, lens, ctx, kind)
            for (s, lv), tok in zip(new, self._pick(logits, [lv for _, lv in new])):
                self.live[s], self.pos[s] = lv, len(lv.req.prompt)
                self._emit(s, tok, updates)
            self._decode_ctx = None

    def _decode(self, updates: list) -> None:
        rows = [s for s in range(self.slots) if self.live[s] is not None]
        last = [lv.out[-1] if lv is not None and lv.out else self.pad_id for lv in self.live]
        deltas = [lv.req.delta if lv is not None else None for lv in self.live]
        adapters = [lv.req.adapters if lv is not None else None for lv in self.live]
        selective = any(a is not None for a in adapters)
        sole = deltas[rows[0]] if self.merge_single and not selective and \
            all(deltas[s] is deltas[rows[0]] for s in rows) else None
        self._merge(sole)
        if sole is not None:  # one account's batch: its delta is in the weights, the base graph replays
            ctx, with_deltas = self._no_deltas, False
        elif selective:  # token-selective adapters gate per token: eager, through the row context
            if self._decode_ctx is None or not self._decode_ctx.adapters:
                self._decode_ctx = _RowDeltas(deltas, self.dtype, adapters)
            ctx, with_deltas = self._decode_ctx, True
        elif self._table is not None:
            if self._table.assign(deltas):
                self._drop_delta_graphs()
            ctx, with_deltas = (self._table if self._table.active else self._no_deltas), self._table.active
        else:
            if self._decode_ctx is None:
                self._decode_ctx = _RowDeltas(deltas, self.dtype)
            ctx, with_deltas = self._decode_ctx, any(d is not None for d in deltas)
        span = min(self.max_len, -(-(max(self.pos[s] for s in rows) + 1) // self.bucket) * self.bucket)
        self.ctx = ctx
        try:
            logits = self._decode_logits(last, span, with_deltas, eager=selective)
        finally:
            self.ctx = None
        for s, tok in zip(rows, self._pick(logits[rows], [self.live[s] for s in rows])):
            self.pos[s] += 1
            self._emit(s, tok, updates)

    def _sole(self, deltas: list[Delta | None]) -> Delta | None:
        """The one account (a delta, no adapters) of `deltas` and of every live request, when
        `merge_single`; else None."""
        live = [lv.req for lv in self.live if lv is not None]
        if not self.merge_single or deltas[0] is None or any(r.adapters is not None for r in live):
            return None
        return deltas[0] if all(d is deltas[0] for d in deltas) and all(r.delta is deltas[0] for r in live) else None

    def _merge(self, delta: Delta | None) -> None:
        """Hold `delta` scattered into the base weights (None: the plain base), restoring the
        previous one bit-exactly first."""
        if self._merged is not None and self._merged[0] is delta:
            return
        if self._merged is not None:
            self._merged[1].restore()
            self._merged = None
        if delta is not None:
            self._merged = (delta, AppliedDelta(self.model, delta))
            self.stats["merges"] += 1

    def _drop_delta_graphs(self) -> None:
        """The slot pool grew: graphs that read its old buffers are stale. Their recapture may
        compile the step again (new buffers, new guards), so its spans count as not warmed up."""
        self._graphs = {k: g for k, g in self._graphs.items() if k[0] == "base"}
        self._prefill_graphs = {k: g for k, g in self._prefill_graphs.items() if k[0] == "base"}
        self._warm = {k for k in self._warm if k[0] == "base"}

    def _emit(self, slot: int, token: int, updates: list) -> None:
        lv = self.live[slot]
        done = append_token(lv.out, token, lv.req)
        updates.append((lv.rid, list(lv.out), done))
        if done:
            self.live[slot], self.pos[slot] = None, 0
            self._decode_ctx = None

    def _pick(self, logits: torch.Tensor, lives: list[_Live]) -> list[int]:
        picked = logits.argmax(-1)
        for i, lv in enumerate(lives):
            if lv.req.temperature > 0:
                picked[i] = sample(logits[i], lv.req, lv.gen)
        return picked.tolist()  # the step's one host copy

    # ---- the model, over the static cache ----------------------------------------------------
    def _layers(self, h: torch.Tensor, pos: torch.Tensor, write, attend) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        n, length = h.shape[:2]
        cos, sin = self.model.model.rotary_emb(h, pos)
        for i, (layer, (qkv, gate_up)) in enumerate(zip(self.layers, self._stacks)):
            a, mlp = layer.self_attn, layer.mlp
            r = layer.input_layernorm(h)
            q, k, v = (t.view(n, length, -1, a.head_dim).transpose(1, 2)
                       for t in self._project(qkv, (a.q_proj, a.k_proj, a.v_proj), r))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            write(i, k, v)
            o = attend(i, q, k, v, a.scaling)
            h = h + a.o_proj(o.transpose(1, 2).reshape(n, length, -1))
            r = layer.post_attention_layernorm(h)
            if gate_up is None:
                h = h + mlp(r)
            else:
                g, u = self._project(gate_up, (mlp.gate_proj, mlp.up_proj), r)
                h = h + mlp.down_proj(mlp.act_fn(g) * u)
        return h

    def _projection(self, stack: Stack) -> _Projection:
        pooled = tuple((n, c) for n, c in zip(stack.names, stack.columns)
                       if self._table is not None and n in self._table.shapes)
        return _Projection(stack, self._table.add_group(pooled) if pooled else None)

    def _project(self, proj: _Projection | None, modules: tuple, x: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of `modules` (the linears of `proj`'s stack, in its order), which read x, with
        each row's delta term: one GEMM over their stack and, from the slot pool, one delta launch
        (else one delta term per linear)."""
        ctx = self.ctx
        if proj is None or getattr(ctx, "adapters", None):  # token-selective rows: each linear's own path
            return [m(x) for m in modules]
        stack = proj.stack
        y = F.linear(x, stack.weight)
        if ctx is not None:
            y2, x2 = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
            if hasattr(ctx, "group_add"):  # the slot pool, or a prefill's view of it: one launch a group
                if proj.group is not None:
                    ctx.group_add(y2, x2, proj.group)
            else:
                for name, mod, col, size in zip(stack.names, modules, stack.columns, stack.sizes):
                    seg, values = ctx.module_inputs(name, getattr(mod, "base", mod))
                    if seg is not None:
                        add_delta_term(y2[:, col:col + size], x2, values, seg)
        return y.split(stack.sizes, -1)

    def _prefill(self, ids: torch.Tensor, slots: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """New prompts (right-padded) into their slots -> logits at each prompt's last token."""
        n, width = ids.shape
        self.ctx.tokens = width

        def write(i, k, v):
            self.k[i][slots, :, :width] = k
            self.v[i][slots, :, :width] = v

        def attend(i, q, k, v, scale):  # a new request attends only to its own prompt
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

        pos = torch.arange(width, device=ids.device).expand(n, width)
        h = self._layers(self.model.model.embed_tokens(ids), pos, write, attend)
        last = h[torch.arange(n, device=ids.device), lens - 1]
        self.ctx.tokens = 1  # lm_head sees one row per request
        return self.model.lm_head(self.model.model.norm(last))

    def _prefill_logits(self, ids: torch.Tensor, slots: list[int], lens: torch.Tensor, ctx,
                        kind: str | None) -> torch.Tensor:
        """`_prefill` of new prompts (ids and lens on the host) in context `ctx`: on a GPU, when
        the batch's bucket (`prefill_bucket`) holds at most prefill_graph_tokens tokens and `kind`
        is set ("base": no delta term; "deltas": the slot pool's view), a replay of that kind's
        graph for the bucket (captured at its first use, after one eager run); else eagerly. A
        bucket's padding rows are pad tokens that write the KV cache's spare row and have no delta."""
        n, width = ids.shape
        rows, tokens = prefill_bucket(n, width, self.slots, self.max_len)
        if kind is None or rows * tokens > self.prefill_graph_tokens or not self.cuda_graphs:
            self.ctx = ctx
            try:
                return self._prefill(ids.to(self.device), torch.tensor(slots, device=self.device),
                                     lens.to(self.device))
            finally:
                self.ctx = None
        key = (kind, rows, tokens)
        g = self._prefill_graphs.get(key)
        if g is None:
            g = PrefillGraph(rows, tokens, self.device)
            # the pool's view through the graph's own slots (padding rows: the pool's empty run, index
            # self.slots like their KV row)
            g.ctx = self._table.view(g.slots) if kind == "deltas" else _RowDeltas([None] * rows, self.dtype)
        g.fill(ids, slots, lens, self.pad_id, self.slots)
        self.ctx = g.ctx
        try:
            if g.graph is not None:
                g.graph.replay()
                return g.out[:n]
            out = self._prefill(g.ids, g.slots, g.lens)  # compiles the kernels, builds the view's offsets
            try:
                graph = torch.cuda.CUDAGraph()
                # thread_local: the delta cache's loader threads may allocate on the device meanwhile
                with torch.cuda.graph(graph, pool=self._prefill_pool, capture_error_mode="thread_local"):
                    g.out = self._prefill(g.ids, g.slots, g.lens)
            except RuntimeError as e:  # the batch has its logits (eager); a bucket tries again at its next use
                self._prefill_capture_failures += 1
                print(f"CUDA graph capture of a prefill failed ({self._prefill_capture_failures} of 3 before "
                      f"prefilling eagerly for good): {e}")
                if self._prefill_capture_failures >= 3:  # an op that cannot be captured
                    self.prefill_graph_tokens = 0
                return out[:n]
            g.graph = graph
            self._prefill_graphs[key] = g
            self.stats["graph_captures"] += 1
            return out[:n]
        finally:
            self.ctx = None

    def _decode_logits(self, last: list[int], span: int, deltas: bool, eager: bool = False) -> torch.Tensor:
        """The decode step, eagerly or as a CUDA graph replay (captured on first use per span, after
        one eager run that compiles the kernels and builds the deltas' index plans)."""
        tokens, pos = self._static
        tokens.copy_(torch.tensor(last), non_blocking=True)
        pos.copy_(torch.tensor(self.pos), non_blocking=True)
        if eager:
            return self._decode_step(tokens, pos, span)
        step = self._compiled if self._compiled is not None else self._decode_step
        key = ("deltas" if deltas else "base", span)
        if not self.cuda_graphs:
            out = step(tokens, pos, span)
            self._warmed_up(key)
            return out
        if key not in self._graphs:
            out = step(tokens, pos, span)  # writes the same K/V the replay writes (and compiles)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # (as the prefill's)
                    static_out = step(tokens, pos, span)
            except RuntimeError as e:  # e.g. an op that cannot be captured: stay eager from now on
                print(f"CUDA graph capture failed, decoding eagerly: {e}")
                self.cuda_graphs = False
                return out
            self._graphs[key] = (graph, static_out)
            self.stats["graph_captures"] += 1
            self._warmed_up(key)
            return out
        graph, static_out = self._graphs[key]
        graph.replay()
        return static_out

    def _warmed_up(self, key: tuple) -> None:
        """The first step of a (kind, span) has run (compiled, captured; again after the pool grew).
        With `freeze_gc` (a replica's engine), what that made moves out of the garbage collector's
        walks, as the replica's start-up objects do: torch.compile leaves ~90k tracked objects for tkllm-tiny
        (dynamo's graphs and guards, inductor's kernels), which every later full collection would
        walk while every request in flight waits. Collected first, so no garbage is kept."""
        if key in self._warm:
            return
        self._warm.add(key)
        if self.freeze_gc and self._compiled is not None:
            gc.collect()
            gc.freeze()

    def _decode_step(self, last: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """One token per slot (free slots compute on a pad and are ignored) -> logits per slot."""
        every = torch.arange(self.slots, device=last.device)
        mask = (torch.arange(span, device=last.device)[None, :] <= pos[:, None])[:, None, None, :]

        def write(i, k, v):
            self.k[i][every, :, pos] = k[:, :, 0]
            self.v[i][every, :, pos] = v[:, :, 0]

        def attend(i, q, k, v, scale):
            return F.scaled_dot_product_attention(q, self.k[i][: self.slots, :, :span], self.v[i][: self.slots, :, :span],
                                                  attn_mask=mask, scale=scale, enable_gqa=True)

        h = self._layers(self.model.model.embed_tokens(last[:, None]), pos[:, None], write, attend)
        return self.model.lm_head(self.model.model.norm(h[:, 0]))
