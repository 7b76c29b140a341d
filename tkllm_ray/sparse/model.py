"""Put sparse deltas into a model: as trainable modules (training) or scattered into the base
weights in place and restored bit-exactly (one account owning a batch, merging, serving)."""

from __future__ import annotations

import torch
from torch import nn

from tkllm_ray.sparse.delta_op import add_rounded, check_sorted, sparse_delta_linear, split_indices


class SparseDeltaLinear(nn.Module):
    """A frozen nn.Linear plus a trainable sparse Δ: only `values` (k entries, fp32) is a parameter."""

    def __init__(self, base: nn.Linear, indices: torch.Tensor, values: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        indices = indices.to(device=base.weight.device, dtype=torch.int64)
        check_sorted(indices)
        rows, cols = split_indices(indices, base.in_features)
        if base.weight.numel() < 2**31:  # int32 halves the index memory; the kernels read either
            rows, cols = rows.to(torch.int32), cols.to(torch.int32)
        self.register_buffer("indices", indices, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        if isinstance(values, nn.Parameter):  # a SparseState's own tensor: shared, so its optimizer trains it
            if values.numel() != indices.numel():
                raise ValueError("one value per delta index")
            if values.device != base.weight.device:
                raise ValueError(f"delta values on {values.device}, weights on {base.weight.device}")
            self.values = values
        else:
            init = torch.zeros(indices.numel(), dtype=torch.float32, device=base.weight.device)
            self.values = nn.Parameter(init if values is None else values.detach().float().to(init.device).clone())

    def forward(self, x):
        if self.values.numel() == 0:
            return self.base(x)
        return sparse_delta_linear(x, self.base.weight, self.base.bias, self.values, self.indices, self.rows, self.cols)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def attach(model: nn.Module, indices: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None
           ) -> dict[str, SparseDeltaLinear]:
    """Freeze the whole model and swap each selected linear for a SparseDeltaLinear. Modules
    without entries stay plain frozen layers: no weight gradient anywhere else."""
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for name, idx in indices.items():
        if idx.numel() == 0:
            continue
        parent, leaf = _parent(model, name)
        mod = SparseDeltaLinear(getattr(parent, leaf), idx, (values or {}).get(name))
        setattr(parent, leaf, mod)
        out[name] = mod
    return out


def detach(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Put the plain linears back; return {module: (indices, values)}."""
    out = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SparseDeltaLinear):
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, mod.base)
            out[name] = (mod.indices.detach().cpu(), mod.values.detach().cpu())
    return out


class AppliedDelta:
    """Scatter W[idx] += v into the base in place; `restore()` writes back the saved originals,
    so the base is bit-identical afterwards (no float round trip through subtraction). On a GPU,
    the whole delta as one launch each way (merge_triton; this torch path is its reference)."""

    def __init__(self, model: nn.Module, delta: dict[str, tuple[torch.Tensor, torch.Tensor]], fused: bool = True):
        self.saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._merged = None
        weights = [model.get_submodule(name).weight for name in delta]
        if fused and weights and weights[0].device.type == "cuda":
            from tkllm_ray.sparse.merge_triton import MergedDelta, mergeable

            if mergeable(weights):
                self._merged = MergedDelta(weights, *_flat(delta))
                return
        with torch.no_grad():
            for w, (idx, vals) in zip(weights, delta.values()):
                flat = w.view(-1)
                idx = idx.to(w.device)
                orig = flat[idx].clone()
                self.saved.append((flat, idx, orig))
                flat[idx] = add_rounded(orig, vals)

    def restore(self) -> None:
        if self._merged is not None:
            self._merged.restore()
            self._merged = None
        with torch.no_grad():  # last applied first: modules sharing elements get their originals back
            for flat, idx, orig in reversed(self.saved):
                flat[idx] = orig
        self.saved.clear()


def _flat(delta) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(all indices, all values, entries a module), modules in the delta's order: a FlatDelta's
    own buffers (its layout is its order), else the modules' tensors concatenated."""
    if hasattr(delta, "flat") and [n for n, _ in delta.layout] == list(delta):
        return *delta.flat, [k for _, k in delta.layout]
    parts = list(delta.values())
    return torch.cat([i.reshape(-1) for i, _ in parts]), torch.cat([v.reshape(-1) for _, v in parts]), \
        [i.numel() for i, _ in parts]
