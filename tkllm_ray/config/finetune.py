"""The single-account fine-tune job's config (`tkllm finetune`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tkllm_ray.config.base import ConfigModel
from tkllm_ray.config.storage import StorageOptions


class FinetuneConfig(ConfigModel):
    account: str = Field(description="account id to fine-tune")
    data: str = Field(description="ingested dataset root (path or s3://), as written by `tkllm ingest`")
    method: Literal["gspf", "full", "lora", "adapter", "diffpruning"] = Field("gspf", description="fine-tuning method")
    model: str = Field("tkllm-tiny", description="model preset (tkllm-tiny/s/m/l) or a Hugging Face model directory")
    tokenizer: str = Field("builtin", description="tokenizer: 'builtin' or a Hugging Face tokenizer directory")
    output: str = Field("runs/deltas", description="delta store root (path or s3://)")
    seq_len: int = Field(128, ge=8, description="tokens per packed training row")
    batch_size: int = Field(8, ge=1, description="rows per step")
    epochs: int = Field(3, ge=1, description="passes over the account's train posts")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (GSPF, DiffPruning: on the delta)")
    density: float = Field(0.003, gt=0, le=0.05,
                           description="GSPF, DiffPruning: share of the target weights in the published delta")
    scope: Literal["global", "per_module"] = Field("global", description="GSPF: top-p over all modules or per module")
    warmup_steps: int = Field(8, ge=1, description="GSPF: sensitivity warm-up batches")
    reselect_every: int = Field(5, ge=0, description="GSPF: re-select every N epochs (0 = static mask)")
    sensitivity_offload: bool = Field(False, description="GSPF: keep the warm-up's fp32 sensitivity sums in host "
                                      "memory instead of on the GPU")
    top_layers: int | None = Field(None, ge=1, description="GSPF: confine the budget to the N decoder layers the "
                                   "selection favours (backprop stops below them; default: no limit)")
    target_modules: list[str] | None = Field(None, description="GSPF, DiffPruning, LoRA: name fragments of linear "
                                                               "layers to train (default: all)")
    lora_rank: int = Field(16, ge=1, description="LoRA: rank")
    adapter_bottleneck: int = Field(16, ge=1, le=4096, description="Adapter: bottleneck width (hidden -> N -> hidden) "
                                    "of the adapters after each attention and MLP output")
    diffpruning_l0: float = Field(1.0, ge=0, le=1000, description="DiffPruning: weight λ of the L0 penalty, the "
                                  "expected share of open gates (0 = no penalty)")
    diffpruning_mask_epochs: int = Field(1, ge=0, description="DiffPruning: final epochs trained on the fixed "
                                         "projected mask (Guo et al.; 0 = ship the projection as is)")
    diffpruning_alpha_init: float = Field(5.0, ge=-10, le=10, description="DiffPruning: initial gate log-alpha "
                                          "(5: every gate starts almost surely open)")
    seed: int = Field(0, description="random seed")
    device: str = Field("auto", description="cpu, cuda, or auto")
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @model_validator(mode="after")
    def _mask_epochs_leave_gated_training(self):
        if self.method == "diffpruning" and self.diffpruning_mask_epochs >= self.epochs:
            raise ValueError(f"diffpruning_mask_epochs ({self.diffpruning_mask_epochs}) must be below epochs "
                             f"({self.epochs}): the gates need at least one epoch before the projection")
        return self
