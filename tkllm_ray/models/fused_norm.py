"""RMSNorm as one fused op (`F.rms_norm`) instead of the Llama module's six elementwise ops.

The packed trainer's steps are bound by elementwise kernels and their launches (README, packed
profile): each of tkllm-s's 49 norms costs ~6 kernels forward and ~10 backward over fp32 copies of
the activations. `F.rms_norm` normalizes and scales in one kernel a direction (fp32 inside). The
one difference from the module: the weight multiplies before the single cast to the activations'
dtype, not after a cast (in bf16, at most one rounding step apart; in fp32, the same up to the
reduction order).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Point every RMSNorm of `model` (a module with `weight` and `variance_epsilon`, as Llama's)
    at the fused op; returns how many. Norms whose weight another library manages (ZeRO-3
    partitions: `ds_id`) keep their own forward."""
    count = 0
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and \
                isinstance(getattr(m, "weight", None), torch.Tensor) and not hasattr(m.weight, "ds_id"):
            m.forward = types.MethodType(_fused_forward, m)
            count += 1
    return count
