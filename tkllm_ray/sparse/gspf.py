"""GSPF as a reusable object: warm-up sensitivity -> select -> sparse AdamW -> re-select -> export.

The trainable state (indices, values, AdamW, re-selection carry rules) is a `SparseState`
(sparse/state.py); GSPF attaches it to one model, whose SparseDeltaLinear modules share its value
tensors, and measures sensitivity on that model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from tkllm_ray.sparse.model import AppliedDelta, SparseDeltaLinear, attach, detach
from tkllm_ray.sparse.selection import Selection, select
from tkllm_ray.sparse.sensitivity import collect_sensitivity, target_linears
from tkllm_ray.sparse.state import SparseState

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


class GSPF:
    def __init__(self, model: nn.Module, loss_fn: LossFn, settings: GSPFSettings | None = None):
        self.model, self.loss_fn, self.s = model, loss_fn, settings or GSPFSettings()
        self.targets = list(target_linears(model, self.s.target_modules))
        self.modules: dict[str, SparseDeltaLinear] = {}
        self.state = SparseState(self.s.lr, self.s.betas, self.s.weight_decay, self.s.reselect_state)

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
        self.modules = {}
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
        # Indices may come from the CPU (offloaded scores, a DiffPruning export): values live with the weights.
        on_device = {n: i.to(self.model.get_submodule(n).weight.device) for n, i in sel.indices.items()}
        self.state.install(on_device, learned)  # records entries and mask overlap in state.history
        self.modules = attach(self.model, self.state.indices, self.state.values)

    @property
    def opt(self) -> torch.optim.Optimizer | None:
        return self.state.opt

    # -- training --------------------------------------------------------------------------
    def step(self, batch) -> float:
        self.model.train()
        loss = self.loss_fn(self.model, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def export(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.state.export()
