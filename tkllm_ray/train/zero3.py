"""DeepSpeed ZeRO-3 under the packed engine, for bases that do not fit one GPU (tkllm-l, 7B).

The base is frozen and sharded: each worker holds 1/N of every weight, and DeepSpeed's module
hooks gather a layer's weights for its forward and again for its backward. The accounts' sparse
states stay local to the worker that trains them (the engine's usual per-account values and AdamW),
so nothing about an account is sharded or communicated.

What sharding changes is that every forward and backward is a collective: all workers must run
the same passes over the same modules in the same order, even when their accounts differ. The
engine keeps them in step (`Lockstep`): a worker out of accounts runs idle passes until all are
done, every pass backpropagates through the whole model (from the embeddings), every target
module runs the segmented op even when none of the batch's accounts has entries there (so the
autograd graphs, and hence the gather order, match), and the steps that read weights (selection
scores, held-out evaluation) happen in rounds every worker joins.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from tkllm_ray.models.presets import PRESETS, build_model, check_vocab, fingerprint_of, pretrained_dir


def ds_config(dtype: torch.dtype, hidden_size: int) -> dict:
    """ZeRO-3 for a frozen base: parameters partitioned, no optimizer state (the accounts' AdamW
    states are the engine's), bf16 when the base is. Vectors (norms) stay whole on every worker
    (gathering them costs more than they weigh); every matrix is partitioned."""
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": False,
                                  "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": hidden_size},
            "bf16": {"enabled": dtype == torch.bfloat16}}


def load_sharded_base(spec: str, vocab_size: int, seed: int, dtype: torch.dtype, device: torch.device,
                      options=None, tokenizer_name: str = "builtin") -> nn.Module:
    """The base, partitioned across the worker group. A preset is built whole on `device` from
    `seed` (the very weights `build_model` gives: same fingerprint) and then partitioned; a model
    directory (local or s3://) loads through transformers' ZeRO-3 path, never whole anywhere."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # reuses Ray Train's process group
    if spec in PRESETS:
        cfg = ds_config(dtype, PRESETS[spec]["hidden_size"])
        model = build_model(spec, vocab_size=vocab_size, seed=seed, dtype=dtype, device=device)
        deepspeed.zero.Init(module=model, config_dict_or_path=cfg, dtype=dtype)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        from tkllm_ray.storage.cache import local_dir

        path = pretrained_dir(spec) or local_dir(spec, "model directory", options)
        cfg = ds_config(dtype, AutoConfig.from_pretrained(path, local_files_only=True).hidden_size)
        hf_ds = HfDeepSpeedConfig(cfg)  # while it lives, from_pretrained builds under zero.Init
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        assert hf_ds.is_zero3()
    check_vocab(model, vocab_size, spec, tokenizer_name)
    for p in model.parameters():
        p.requires_grad_(False)
    deepspeed.initialize(model=model, config=cfg)  # installs the gather/release hooks on every module
    return model


def is_sharded(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_id")


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's full shape, sharded or not (a ZeRO-3 partition is an empty local tensor)."""
    return weight.ds_shape if is_sharded(weight) else weight.shape


def gathered(weights: list[torch.Tensor]):
    """The full weights inside the block (a collective: every worker must enter it alike);
    a no-op for plain tensors and for shards that are whole already (persistent vectors)."""
    if not any(is_sharded(w) for w in weights):
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    sharded = [w for w in weights if is_sharded(w) and w.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not sharded:
        return contextlib.nullcontext()

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=None)


def fingerprint_sharded(model: nn.Module) -> str:
    """`models.fingerprint` of a sharded base: the same bytes hashed in the same order (so a
    delta trained here names the same base as one trained on an unsharded copy), one gathered
    parameter at a time. Every worker computes it (the gathers are collective)."""
    params = dict(model.named_parameters())

    def whole():
        for name, t in sorted(model.state_dict().items()):
            p = params.get(name, t)
            with gathered([p]):
                yield name, p  # hashed before the next gather releases it

    return fingerprint_of(whole())


class Lockstep:
    """What the workers of a sharded base agree on before each collective step: the maximum of a
    few counters over all workers (who still has work, how many accounts select, how many
    evaluation forwards are due)."""

    def __init__(self, device: torch.device):
        # NCCL reduces device tensors; gloo (CPU workers) host tensors
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def max(self, *counts: int) -> list[int]:
        t = torch.tensor(counts, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()
