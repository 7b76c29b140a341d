"""DiffPruning (Guo et al. 2021) as a reusable object, the way `GSPF` is: `step(batch)`, `export()`.

Each target linear (GSPF's targets: `target_linears`) gets a dense trainable delta w and a
hard-concrete gate log α per weight entry (Louizos et al. 2018: β = 2/3, γ = -0.1, ζ = 1.1); the
forward uses W + z ⊙ w, z sampled while training and the deterministic gate ẑ at eval. The loss adds
λ · Σ P(z ≠ 0) / N, the expected share of open gates. `export()` then projects onto GSPF's budget:
the round(density · N) entries with the largest |ẑ · w| over all targets, valued ẑ · w, in the sparse
delta format, so serving treats it like a GSPF delta. As Guo et al., the projected mask is then
trained further for `diffpruning_mask_epochs` (by `GSPF.from_delta`, see train/single.py).

Memory-hungry by nature: w and log α are dense fp32 copies of every target weight, each with a
gradient and two AdamW moments (8 × the targets), plus one dense W + z ⊙ w per layer in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tkllm_ray.sparse.delta_store import Delta
from tkllm_ray.sparse.selection import budget, top_k
from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.train.baselines import Insertion, LossFn, optimizer_step

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # hard-concrete temperature and stretch interval (γ, ζ)


def hard_concrete(log_alpha: torch.Tensor, sample: bool) -> torch.Tensor:
    """Gates in [0, 1]: a reparameterised sample (training) or the deterministic ẑ (eval)."""
    if sample:
        u = torch.rand_like(log_alpha).clamp_(1e-6, 1 - 1e-6)
        s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    else:
        s = torch.sigmoid(log_alpha)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z ≠ 0) per entry: the differentiable expected L0."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


class GatedDeltaLinear(nn.Module):
    """y = x (W + z ⊙ w)ᵀ + b: W frozen; w (zero at start, so the model starts as the base) and log α train."""

    def __init__(self, base: nn.Linear, alpha_init: float):
        super().__init__()
        self.base = base
        self.w = nn.Parameter(torch.zeros(base.weight.shape, dtype=torch.float32, device=base.weight.device))
        self.log_alpha = nn.Parameter(torch.full_like(self.w, alpha_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = hard_concrete(self.log_alpha, self.training) * self.w
        return F.linear(x, self.base.weight + delta.to(self.base.weight.dtype), self.base.bias)


@dataclass
class DiffPruningSettings:
    density: float = 0.003  # the exported share of the target weights: GSPF's budget
    target_modules: list[str] | None = None  # None: every linear layer, LM head included (as GSPF)
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled, on w only (not on the gates)
    l0: float = 1.0  # λ on the expected share of open gates
    alpha_init: float = 5.0  # initial log α: P(z ≠ 0) ≈ 0.999, every gate starts open


class DiffPruning(Insertion):
    def __init__(self, model: nn.Module, loss_fn: LossFn, settings: DiffPruningSettings | None = None):
        self.loss_fn, self.s = loss_fn, settings or DiffPruningSettings()
        targets = list(target_linears(model, self.s.target_modules))
        super().__init__(model, lambda lin: GatedDeltaLinear(lin, self.s.alpha_init), targets)
        self.entries = sum(m.w.numel() for m in self.modules.values())
        self.opt = torch.optim.AdamW(
            [{"params": [m.w for m in self.modules.values()], "weight_decay": self.s.weight_decay},
             {"params": [m.log_alpha for m in self.modules.values()], "weight_decay": 0.0}], lr=self.s.lr)

    def l0(self) -> torch.Tensor:
        """Σ P(z ≠ 0) / N over every target entry, in [0, 1]."""
        return sum(open_probability(m.log_alpha).sum() for m in self.modules.values()) / self.entries

    def step(self, batch) -> float:
        return optimizer_step(self.model, self.loss_fn, self.opt, batch, lambda: self.s.l0 * self.l0())

    @torch.no_grad()
    def export(self) -> Delta:
        """The projection: top round(density · N) entries by |ẑ · w|; modules left without one are left out."""
        scores = {n: (hard_concrete(m.log_alpha, False) * m.w).abs_().flatten() for n, m in self.modules.items()}
        idx = top_k(scores, budget(self.s.density, self.entries))
        del scores  # one dense copy at a time
        out = {}
        for n, i in idx.items():
            if i.numel():
                m = self.modules[n]
                out[n] = (i.cpu(), (hard_concrete(m.log_alpha.flatten()[i], False) * m.w.flatten()[i]).cpu())
        return out
