"""A frozen base linear that adds each row's own account delta (the segmented op) when its owner
has a batch context set, and is the plain base linear otherwise. Training (train/packed.py) and
serving (serve/engine.py) both swap the model's target linears for it; the owner's `ctx` says,
per module, whose rows are where and whose entries are where (`module_inputs`)."""

from __future__ import annotations

from torch import nn

from tkllm_ray.sparse.segmented import segmented_delta


class MixedDeltaLinear(nn.Module):
    def __init__(self, name: str, base: nn.Linear, owner):
        super().__init__()
        self.name, self.base, self.owner = name, base, [owner]  # a list: the owner is not a submodule

    @property
    def weight(self):  # selection and AppliedDelta address the base weight by module name
        return self.base.weight

    def delta_inputs(self):
        ctx = self.owner[0].ctx
        return ctx.module_inputs(self.name, self.base) if ctx is not None else (None, None)

    def forward(self, x):
        seg, values = self.delta_inputs()
        y = self.base(x)  # the base module's own forward: whatever manages its weight (e.g. ZeRO-3) sees it
        if seg is not None:
            y = y + segmented_delta(x, values, seg, self.base.in_features, self.base.out_features)
        return y


def swap_in(model: nn.Module, linears: dict[str, nn.Linear], owner, cls=MixedDeltaLinear) -> None:
    """Replace each named linear of `model` by `cls(name, linear, owner)`."""
    for name, lin in linears.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, cls(name, lin, owner))


def swap_out(model: nn.Module) -> None:
    """Put the plain base linears back (the model as it was before `swap_in`)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MixedDeltaLinear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, mod.base)
