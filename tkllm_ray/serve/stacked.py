"""Linears that read the same input (a layer's q/k/v, its gate/up) stacked into one weight, so the
serving engine runs one GEMM per group, and on a GPU one delta launch per group from the slot pool,
where it ran one of each per linear (24 layers x 7 -> 24 x 4 a decode step for tkllm-s).

Each linear's weight becomes a view of its rows of the stack: the model's own forward, merging a
delta into a linear by name (AppliedDelta) and the per-linear delta paths all keep working, and the
base weights take no extra memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Stack:
    weight: torch.Tensor  # (Σ out_features, in_features): the linears' weights, one after another
    names: list[str]  # the linears, in stacking order
    sizes: list[int]  # their out_features
    columns: list[int]  # where each one's outputs start among the stack's


def stack_linears(model: nn.Module, names: list[str]) -> Stack | None:
    """Stack the named linears of `model` (their weights become views of the stack), or None when
    they cannot share one GEMM: not all plain bias-free nn.Linear with one input size, dtype and device."""
    lins = [model.get_submodule(n) for n in names]
    if not all(type(lin) is nn.Linear and lin.bias is None for lin in lins):
        return None
    if len({(lin.in_features, lin.weight.dtype, lin.weight.device) for lin in lins}) != 1:
        return None
    weight = torch.cat([lin.weight.detach() for lin in lins])
    sizes = [lin.out_features for lin in lins]
    columns = [sum(sizes[:i]) for i in range(len(sizes))]
    for lin, col, size in zip(lins, columns, sizes):
        lin.weight = nn.Parameter(weight[col:col + size], requires_grad=False)
    return Stack(weight, names, sizes, columns)


def layer_stacks(model: nn.Module) -> list[tuple[Stack | None, Stack | None]]:
    """Per decoder layer of a Llama-family model: (q/k/v stack, gate/up stack), None where the
    layer's linears do not stack."""
    out = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        attn = stack_linears(model, [f"{prefix}.self_attn.{p}_proj" for p in "qkv"])
        mlp = stack_linears(model, [f"{prefix}.mlp.{p}_proj" for p in ("gate", "up")]) \
            if hasattr(layer.mlp, "gate_proj") and hasattr(layer.mlp, "act_fn") else None
        out.append((attn, mlp))
    return out
