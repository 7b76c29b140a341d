"""Generation for a batch that mixes accounts: one shared base model, each request's rows through
its own account's W + Δ (the segmented op, as in packed training), prefill and decode batched,
a KV cache per request. Greedy output for an account equals the base with that account's delta
merged in; a request's tokens do not depend on what else is in its batch (tested).

This is the static-batch core a replica runs per batch; the Ray Serve app feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from tkllm_ray.sparse.delta_store import Delta
from tkllm_ray.sparse.mixed import rows_inputs, swap_in
from tkllm_ray.sparse.sensitivity import target_linears


@dataclass
class GenRequest:
    prompt: list[int]
    delta: Delta | None = None  # the account's delta (module -> (indices, values)); None: the base alone
    max_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[list[int]] = field(default_factory=list)  # token sequences that end the output (not returned)
    eos_id: int | None = None


class _RowDeltas:
    """The batch context the mixed linears read: request i owns rows [i·L, (i+1)·L) of the
    flattened activations (L = tokens per request in this forward: the prompt length, then 1)."""

    def __init__(self, deltas: list[Delta | None], dtype: torch.dtype):
        self.deltas, self.dtype = deltas, dtype
        self.tokens = 1
        self._inputs: dict[tuple[str, int], tuple] = {}

    def module_inputs(self, name: str, lin: nn.Linear):
        key = (name, self.tokens)
        if key not in self._inputs:  # once per phase: every decode step reuses it
            parts = [d.get(name) if d is not None else None for d in self.deltas]
            self._inputs[key] = rows_inputs(parts, [self.tokens] * len(self.deltas), lin, self.dtype)
        return self._inputs[key]


class DeltaBatchEngine:
    def __init__(self, model: nn.Module, pad_id: int = 0, target_modules: list[str] | None = None):
        self.model, self.pad_id = model.eval(), pad_id
        for p in model.parameters():
            p.requires_grad_(False)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.ctx: _RowDeltas | None = None
        swap_in(model, target_linears(model, target_modules), self)

    def generate(self, requests: list[GenRequest]) -> list[list[int]]:
        """New tokens per request (stop sequences and EOS not included)."""
        out = [[] for _ in requests]
        for updates in self.stream(requests):
            for i, tokens, _ in updates:
                out[i] = tokens
        return out

    @torch.no_grad()
    def stream(self, requests: list[GenRequest]) -> Iterator[list[tuple[int, list[int], bool]]]:
        """Per decode step, (request index, its tokens so far, finished) for each request that
        changed. A stop sequence is removed when it completes, so a consumer that streams text
        holds back the last tokens that could still turn out to start one."""
        from transformers import DynamicCache

        if not requests:
            return
        for r in requests:
            if not r.prompt:
                raise ValueError("every request needs a non-empty prompt")
        width = max(len(r.prompt) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):  # left padding: every row's next token is at the end
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator(device=self.device).manual_seed(r.seed) if r.seed is not None else None
                for r in requests]
        cache, out = DynamicCache(), [[] for _ in requests]
        done = [r.max_tokens <= 0 for r in requests]
        if any(done):
            yield [(i, [], True) for i in range(len(requests)) if done[i]]
        self.ctx = _RowDeltas([r.delta for r in requests], self.dtype)
        try:
            self.ctx.tokens = width
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True).logits[:, -1]
            while not all(done):
                nxt = [self._pick(logits[i], r, gens[i]) for i, r in enumerate(requests)]
                updates = []
                for i, r in enumerate(requests):
                    if not done[i]:
                        done[i] = self._append(out[i], nxt[i], r)
                        updates.append((i, list(out[i]), done[i]))
                yield updates
                if all(done):
                    break
                mask = torch.cat([mask, mask.new_ones(len(requests), 1)], dim=1)
                pos = pos[:, -1:] + 1
                self.ctx.tokens = 1
                step = torch.tensor(nxt, device=self.device).unsqueeze(1)
                logits = self.model(input_ids=step, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                    use_cache=True).logits[:, -1]
        finally:
            self.ctx = None

    @staticmethod
    def _pick(logits: torch.Tensor, r: GenRequest, gen: torch.Generator | None) -> int:
        if r.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float() / r.temperature, dim=-1)
        if r.top_p < 1.0:  # nucleus: the smallest set of top tokens holding top_p of the mass
            sorted_p, order = torch.sort(probs, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < r.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    @staticmethod
    def _append(out: list[int], token: int, r: GenRequest) -> bool:
        """Add `token`; True when the request is finished (EOS, a stop sequence, max_tokens)."""
        if r.eos_id is not None and token == r.eos_id:
            return True
        out.append(token)
        for s in r.stop:
            if s and out[-len(s):] == s:
                del out[-len(s):]
                return True
        return len(out) >= r.max_tokens
