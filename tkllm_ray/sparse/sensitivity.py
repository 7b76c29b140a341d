"""Warm-up gradient sensitivity S_i = mean_t |∂L/∂θ_i| for the target linear layers.

Memory-flat, after RoSA: no weight ever has requires_grad, so autograd keeps no dense weight
gradient and there is no optimizer state. A forward hook keeps each target layer's input; a
hook on its output receives dy and adds |dyᵀx| (this step's dense gradient, transient) into one
fp32 accumulator per module, on the module's device or offloaded to CPU.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def target_linears(model: nn.Module, include: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """Linear layers to fine-tune: all of them, the LM head included unless tied (GSPF's default), or those
    whose qualified name contains one of `include` (e.g. ["q_proj", "down_proj", "lm_head"])."""
    # A head tied to the input embedding (SmolLM2 and other small models) is left out: a delta on
    # it would change the embedding too once merged, which the training forward never saw.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = emb.weight if emb is not None else None
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (include is None or any(key in name for key in include)):
            if tied is not None and mod.weight is tied:
                continue
            out[name] = mod
    return out


@torch.no_grad()
def add_abs_grad(acc: torch.Tensor, dy: torch.Tensor, x: torch.Tensor) -> None:
    """acc += |dyᵀx|: one step's weight gradient of a linear, in absolute value."""
    # In the model's dtype: for a bf16 model this is exactly the weight gradient autograd would
    # give (fp32-accumulated GEMM), without fp32 copies of dy and x; the running sum is fp32.
    g = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    acc.add_(g.abs_().to(acc.device))


def grads_from_embeddings(model: nn.Module):
    """Gradients must flow with every weight frozen: start the graph at the embedding output.
    Returns the hook handle (`.remove()` when the pass is done)."""
    return model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))


def collect_sensitivity(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: Callable[[nn.Module, dict], torch.Tensor],
    modules: dict[str, nn.Linear],
    offload: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean |gradient| per weight entry of each module in `modules`, over `batches`."""
    was_training = model.training
    model.eval()  # deterministic (no dropout) sensitivities
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    acc = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device="cpu" if offload else m.weight.device)
           for n, m in modules.items()}
    handles = []

    def make_hook(name):
        def hook(mod, inputs, output):
            x = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda dy: add_abs_grad(acc[name], dy, x))
        return hook

    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(make_hook(name)))
    handles.append(grads_from_embeddings(model))
    steps = 0
    try:
        for batch in batches:
            loss = loss_fn(model, batch)
            loss.backward()
            steps += 1
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if steps == 0:
        raise ValueError("sensitivity needs at least one batch")
    return {n: a.div_(steps) for n, a in acc.items()}
