"""Token-selective adapters (TS-LoRA, TS-DoRA; train/ts_peft.py) as a serving replica holds them:
plain fp32 tensors per module, applied to a request's rows with the same gated inference the
training modules run (`ts_peft.infer`), so served output equals the training-time forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tkllm_ray.train import ts_peft


@dataclass
class Adapters:
    kind: str  # ts-lora | ts-dora
    scale: float
    modules: dict[str, dict[str, torch.Tensor]]  # module -> lora_A, lora_B, tau[, magnitude], as trained

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "Adapters":
        if meta.get("method") not in ts_peft.KINDS:
            raise ValueError(f"unknown adapter method {meta.get('method')!r}")
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, param = key.rsplit(".", 1)
            modules.setdefault(name, {})[param] = t  # as trained (fp32): the gate compares what training compared
        if sorted(modules) != sorted(meta["modules"]):
            raise ValueError("adapter tensors do not match the modules ts_config.json names")
        need = {"lora_A", "lora_B", "tau"} | ({"magnitude"} if meta["method"] == "ts-dora" else set())
        for name, t in modules.items():
            if set(t) != need:
                raise ValueError(f"module {name}: tensors {sorted(t)}, expected {sorted(need)}")
        return cls(meta["method"], float(meta["alpha"]) / int(meta["rank"]), modules)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.values())

    def to(self, device: torch.device, pin: bool = False) -> "Adapters":
        move = (lambda t: t.pin_memory()) if pin and device.type == "cpu" else (lambda t: t.to(device, non_blocking=True))
        return Adapters(self.kind, self.scale, {n: {k: move(t) for k, t in m.items()} for n, m in self.modules.items()})

    def check(self, shapes: dict[str, int]) -> None:
        """Every module a target linear of the served base, with matching sizes (`shapes`: numel)."""
        for name, t in self.modules.items():
            if name not in shapes:
                raise ValueError(f"module {name} is not a target linear of the served base")
            (rank, din), (dout, rank_b) = t["lora_A"].shape, t["lora_B"].shape
            if rank != rank_b or din * dout != shapes[name]:
                raise ValueError(f"module {name}: adapter shapes {tuple(t['lora_A'].shape)}, "
                                 f"{tuple(t['lora_B'].shape)} do not fit its {shapes[name]} weights")

    def apply(self, name: str, base: nn.Linear, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        """y0 (the base's output for rows x) plus the gated update, where this module has an adapter."""
        t = self.modules.get(name)
        return y0 if t is None else ts_peft.infer(self.kind, t, self.scale, base, x, y0)[0]
