"""GSPF as a reusable object: warm-up sensitivity -> select -> sparse AdamW -> re-select -> export.

Re-selection keeps the learned value of every entry that stays selected; new entries start at
zero. Optimizer state is carried for staying entries (`carry`) or dropped (`reset`). AdamW keeps
one step counter per tensor, so under `carry` new entries share the tensor's bias correction: a
deliberate approximation (SpIEL keeps a per-entry age instead); `reset` is exact Adam from scratch.
Weight decay is decoupled and acts on Δ (pulls the delta toward the base), not on W + Δ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from tkllm_ray.sparse.model import AppliedDelta, SparseDeltaLinear, attach, detach
from tkllm_ray.sparse.selection import Selection, select
from tkllm_ray.sparse.sensitivity import collect_sensitivity, target_linears

LossFn = Callable[[nn.Module, object], torch.Tensor]


@dataclass
class GSPFSettings:
    density: float = 0.003
    scope: str = "global"  # or "per_module"
    target_modules: list[str] | None = None  # None: every linear layer, LM head included
    top_layers: int | None = None  # confine the budget to the N most-favoured decoder layers
    offload_sensitivity: bool = False  # keep the fp32 sensitivity sums in host memory (7B: 28 GB off the GPU)
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    reselect_state: str = "carry"  # or "reset"
    history: list[dict] = field(default_factory=list)


class GSPF:
    def __init__(self, model: nn.Module, loss_fn: LossFn, settings: GSPFSettings | None = None):
        self.model, self.loss_fn, self.s = model, loss_fn, settings or GSPFSettings()
        self.targets = list(target_linears(model, self.s.target_modules))
        self.modules: dict[str, SparseDeltaLinear] = {}
        self.opt: torch.optim.Optimizer | None = None

    @classmethod
    def from_delta(cls, model: nn.Module, loss_fn: LossFn, delta: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   settings: GSPFSettings | None = None) -> "GSPF":
        """Train a given mask from given values, no sensitivity pass: continuing a published delta,
        or a mask chosen by another method (DiffPruning's projection)."""
        g = cls(model, loss_fn, settings)
        sel = Selection({n: i for n, (i, _) in delta.items()}, g.s.density)
        g._install(sel, {n: (i, v.float()) for n, (i, v) in delta.items()})
        return g

    # -- selection -------------------------------------------------------------------------
    def _linears(self) -> dict[str, nn.Linear]:
        out = {}
        for n in self.targets:
            m = self.model.get_submodule(n)
            out[n] = m.base if isinstance(m, SparseDeltaLinear) else m
        return out

    def sensitivity_select(self, batches: Iterable) -> Selection:
        # Sensitivity of the current model W + Δ: fold the learned Δ in, measure, fold it out.
        learned = detach(self.model) if self.modules else {}
        applied = AppliedDelta(self.model, learned)
        try:
            lin = self._linears()
            sens = collect_sensitivity(self.model, batches, self.loss_fn, lin, offload=self.s.offload_sensitivity)
            sel = select(sens, {n: m.weight for n, m in lin.items()}, self.s.density, self.s.scope, self.s.top_layers,
                         inplace=True)  # the sensitivities are not needed after scoring
            del sens
        finally:
            applied.restore()
        self._install(sel, learned)
        return sel

    def _install(self, sel: Selection, learned: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        values, carried, kept, old_total = {}, {}, 0, sum(i.numel() for i, _ in learned.values())
        for n, idx in sel.indices.items():
            v = torch.zeros(idx.numel(), device=idx.device)
            if n in learned:  # learned values come back on the CPU (detach); selections live on the device
                old_idx, old_v = learned[n][0].to(idx.device), learned[n][1].to(idx.device)
                pos, hit = _match(idx, old_idx)
                v[hit] = old_v[pos[hit]]
                carried[n] = (pos, hit)
                kept += int(hit.sum())
            values[n] = v
        old_state = self._state_by_module() if self.opt is not None else {}
        self.modules = attach(self.model, sel.indices, values)
        self.opt = torch.optim.AdamW([m.values for m in self.modules.values()], lr=self.s.lr,
                                     betas=self.s.betas, weight_decay=self.s.weight_decay)
        if self.s.reselect_state == "carry" and old_state:
            for n, m in self.modules.items():
                if n in old_state and n in carried:
                    pos, hit = carried[n]
                    st = old_state[n]
                    new = {"step": st["step"].clone(), "exp_avg": torch.zeros_like(m.values),
                           "exp_avg_sq": torch.zeros_like(m.values)}
                    new["exp_avg"][hit] = st["exp_avg"][pos[hit]]
                    new["exp_avg_sq"][hit] = st["exp_avg_sq"][pos[hit]]
                    self.opt.state[m.values] = new
        self.s.history.append({"entries": sel.k, "overlap": kept / old_total if old_total else None})

    def _state_by_module(self) -> dict[str, dict]:
        return {n: dict(self.opt.state[m.values]) for n, m in self.modules.items() if m.values in self.opt.state}

    # -- training --------------------------------------------------------------------------
    def step(self, batch) -> float:
        self.model.train()
        loss = self.loss_fn(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def export(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m.indices.detach().cpu(), m.values.detach().cpu()) for n, m in self.modules.items()}


def _match(new_idx: torch.Tensor, old_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each new index: its position in the sorted `old_idx` and whether it is there."""
    if old_idx.numel() == 0:
        return torch.zeros_like(new_idx), torch.zeros(new_idx.numel(), dtype=torch.bool, device=new_idx.device)
    pos = torch.searchsorted(old_idx, new_idx).clamp(max=old_idx.numel() - 1)
    return pos, old_idx[pos] == new_idx
