"""A generation request as the engine takes it, and what decides each of its tokens: sampling
(temperature, nucleus) and the end of its output (EOS, stop sequences, max_tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tkllm_ray.serve.adapters import Adapters
from tkllm_ray.sparse.delta_store import Delta


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
    adapters: Adapters | None = None  # a token-selective account's adapters (serve/adapters.py)


def sample(logits: torch.Tensor, r: GenRequest, gen: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / r.temperature, dim=-1)
    if r.top_p < 1.0:  # nucleus: the smallest set of top tokens holding top_p of the mass
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < r.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return torch.multinomial(probs, 1, generator=gen)[0]


def append_token(out: list[int], token: int, r: GenRequest) -> bool:
    """Add `token`; True when the request is finished (EOS, a stop sequence, max_tokens)."""
    if r.eos_id is not None and token == r.eos_id:
        return True
    out.append(token)
    for s in r.stop:
        if s and out[-len(s):] == s:
            del out[-len(s):]
            return True
    return len(out) >= r.max_tokens
