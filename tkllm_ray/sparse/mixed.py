"""A frozen base linear that adds each row's own account delta (the segmented op) when its owner
has a batch context set, and is the plain base linear otherwise. Training (train/packed.py) and
serving (serve/engine.py) both swap the model's target linears for it; the owner's `ctx` says,
per module, whose rows are where and whose entries are where (`module_inputs`)."""

from __future__ import annotations

import torch
from torch import nn

from tkllm_ray.sparse.segmented import Segments, segmented_delta_add, segmented_delta_linear


class MixedDeltaLinear(nn.Module):
    def __init__(self, name: str, base: nn.Linear, owner):
        super().__init__()
        self.name, self.base, self.owner = name, base, [owner]  # a list: the owner is not a submodule
        # A plain linear whose weight is a local tensor takes the fused op; one whose weight
        # something else manages (ZeRO-3 partitions it: `ds_id`) runs its own forward first.
        self.fused = type(base) is nn.Linear and not hasattr(base.weight, "ds_id")

    @property
    def weight(self):  # selection and AppliedDelta address the base weight by module name
        return self.base.weight

    def delta_inputs(self):
        ctx = self.owner[0].ctx
        return ctx.module_inputs(self.name, self.base) if ctx is not None else (None, None)

    def forward(self, x):
        seg, values = self.delta_inputs()
        if seg is None:
            out = self.base(x)
        elif self.fused:
            out = segmented_delta_linear(x, self.base.weight, self.base.bias, values, seg)
        else:
            out = segmented_delta_add(self.base(x), x, values, seg)
        ctx = self.owner[0].ctx
        for i, adapters in getattr(ctx, "adapters", ()):  # serving's token-selective rows (engine._RowDeltas)
            out[i:i + 1] = adapters.apply(self.name, self.base, x[i:i + 1], out[i:i + 1])
        return out


def rows_inputs(parts: list, token_counts: list[int], lin: nn.Linear, value_dtype: torch.dtype | None = None,
                always: bool = False) -> tuple[Segments | None, torch.Tensor | None]:
    """One module's segmented-op inputs for a batch whose row groups carry `parts` (each the
    group's (sorted indices, values) for this module, or None): (Segments, all values in group
    order), or (None, None) when no group has entries here (unless `always`: then Segments
    without entries). Values keep their autograd history (training) unless cast to `value_dtype`
    (serving)."""
    if not always and all(p is None for p in parts):
        return None, None
    dev = lin.weight.device
    none_idx = torch.empty(0, dtype=torch.int64, device=dev)  # on the device: no host copy, no sync
    none_val = torch.empty(0, dtype=value_dtype or torch.float32, device=dev)
    seg = Segments.build(token_counts, [none_idx if p is None else p[0] for p in parts], lin.in_features, dev,
                         check=False)  # sorted by construction: selection, or a checked load
    vals = [none_val if p is None else (p[1] if value_dtype is None else p[1].to(dev, value_dtype)) for p in parts]
    return seg, torch.cat(vals)


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
