"""The baselines GSPF is measured against (gradient-surgical paper, §3.1), as reusable trainers:

- `DenseTrainer`: AdamW over whatever the model leaves trainable (full FT, LoRA, Adapter).
- `Adapter`: Houlsby bottleneck adapters after each decoder layer's attention output and MLP output;
  exported as `adapter.safetensors` + `adapter_config.json`, re-inserted by `load_adapter`.
- `DiffPruning` (Guo et al. 2021), in `tkllm_ray.train.diffpruning`.

Insertion swaps a linear for a wrapper holding it (as `SparseDeltaLinear` does) rather than adding
forward hooks: the new parameters are then ordinary submodules (printed, moved by `.to()`, copied
with the model to a Ray worker, found by `model.parameters()`), a hook's hidden state can't be lost
on a copy, and `remove()` puts the very same base module objects back, so the base is untouched.
"""

from __future__ import annotations

import json
from typing import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import join, read_bytes, write_bytes

LossFn = Callable[[nn.Module, object], torch.Tensor]

# Llama decoder layers: the attention output and the MLP output, each just before its residual add.
ADAPTER_SITES = ("self_attn.o_proj", "mlp.down_proj")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def optimizer_step(model: nn.Module, loss_fn: LossFn, opt: torch.optim.Optimizer, batch,
                   penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One step of the training loop every method shares; returns the LM loss (without penalty)."""
    model.train()
    loss = loss_fn(model, batch)
    opt.zero_grad(set_to_none=True)
    (loss if penalty is None else loss + penalty()).backward()
    opt.step()
    return float(loss.detach())


class DenseTrainer:
    """Full FT, LoRA and Adapter: AdamW over every parameter that still requires a gradient."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, lr: float, weight_decay: float = 0.0):
        self.model, self.loss_fn = model, loss_fn
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                     weight_decay=weight_decay)

    def step(self, batch) -> float:
        return optimizer_step(self.model, self.loss_fn, self.opt, batch)


class Insertion:
    """Wrappers swapped into a model in place of linears; each keeps the linear it replaced as `.base`."""

    def __init__(self, model: nn.Module, wrap: Callable[[nn.Linear], nn.Module], names: list[str]):
        for p in model.parameters():
            p.requires_grad_(False)
        self.model, self.modules = model, {}
        for name in names:
            self.modules[name] = self._swap(name, wrap(model.get_submodule(name)))

    def _swap(self, name: str, new: nn.Module) -> nn.Module:
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, leaf, new)
        return new

    def remove(self) -> nn.Module:
        """Put the base linears back; returns the (unchanged) base model."""
        for name, mod in self.modules.items():
            self._swap(name, mod.base)
        self.modules = {}
        return self.model


class Bottleneck(nn.Module):
    """h + up(act(down(h))), in fp32; `up` starts at zero, so a fresh adapter is the identity."""

    def __init__(self, dim: int, size: int, activation: str = "gelu"):
        super().__init__()
        self.down, self.up, self.act = nn.Linear(dim, size), nn.Linear(size, dim), ACTIVATIONS[activation]()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.float()))).to(h.dtype)


class AdapterLinear(nn.Module):
    """A frozen linear with a bottleneck adapter on its output."""

    def __init__(self, base: nn.Linear, size: int, activation: str):
        super().__init__()
        self.base = base
        self.adapter = Bottleneck(base.out_features, size, activation).to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))


class Adapter(Insertion):
    """Houlsby adapters on a frozen base: only the adapters' parameters train."""

    def __init__(self, model: nn.Module, bottleneck: int = 16, activation: str = "gelu",
                 sites: tuple[str, ...] = ADAPTER_SITES):
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(tuple(sites))]
        if not names:
            raise TkllmError(f"the model has no {' or '.join(sites)} layers: the adapter baseline needs a "
                             "Llama-style decoder (choose another --method)")
        self.bottleneck, self.activation, self.sites = bottleneck, activation, tuple(sites)
        super().__init__(model, lambda lin: AdapterLinear(lin, bottleneck, activation), names)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": v.detach().cpu().contiguous()
                for n, m in self.modules.items() for k, v in m.adapter.state_dict().items()}

    def save(self, uri: str, base_model: str, base_fingerprint: str, options=None) -> str:
        """The natural export: `uri`/adapter.safetensors + adapter_config.json (config last)."""
        config = {"method": "adapter", "bottleneck": self.bottleneck, "activation": self.activation,
                  "sites": list(self.sites), "modules": list(self.modules), "base_model": base_model,
                  "base_fingerprint": base_fingerprint}
        write_bytes(join(uri, "adapter.safetensors"), st_save(self.state_dict()), options)
        write_bytes(join(uri, "adapter_config.json"), json.dumps(config, indent=2).encode(), options)
        return uri


def load_adapter(uri: str, model: nn.Module, base_fingerprint: str | None = None, options=None) -> Adapter:
    """Re-insert a saved adapter into `model`, a fresh base; with `base_fingerprint`, refuse another base."""
    config = json.loads(read_bytes(join(uri, "adapter_config.json"), options))
    if base_fingerprint is not None and config["base_fingerprint"] != base_fingerprint:
        raise TkllmError(f"adapter {uri} was trained on base {config['base_model']} "
                         f"({config['base_fingerprint'][:19]}…), not the loaded base ({base_fingerprint[:19]}…): "
                         "load the matching base or retrain the account")
    adapter = Adapter(model, config["bottleneck"], config["activation"], tuple(config["sites"]))
    if sorted(adapter.modules) != sorted(config["modules"]):
        adapter.remove()
        raise TkllmError(f"adapter {uri} was saved for other layers than this model has: load the matching base")
    tensors = st_load(read_bytes(join(uri, "adapter.safetensors"), options))
    for n, m in adapter.modules.items():
        m.adapter.load_state_dict({k: tensors[f"{n}.{k}"] for k in m.adapter.state_dict()})
    return adapter
