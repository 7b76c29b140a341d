"""The single-account fine-tune job's config (`tkllm finetune`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tkllm_ray.config.base import ConfigModel
from tkllm_ray.config.storage import StorageOptions


class FinetuneConfig(ConfigModel):
    account: str = Field(description="account id to fine-tune")
    data: str = Field(description="ingested dataset root (path or s3://), as written by `tkllm ingest`")
    method: Literal["gspf", "full", "lora"] = Field("gspf", description="fine-tuning method")
    model: str = Field("tkllm-tiny", description="model preset (tkllm-tiny/s/m/l) or a Hugging Face model directory")
    tokenizer: str = Field("builtin", description="tokenizer: 'builtin' or a Hugging Face tokenizer directory")
    output: str = Field("runs/deltas", description="delta store root (path or s3://)")
    seq_len: int = Field(128, ge=8, description="tokens per packed training row")
    batch_size: int = Field(8, ge=1, description="rows per step")
    epochs: int = Field(3, ge=1, description="passes over the account's train posts")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (GSPF: on the delta)")
    density: float = Field(0.003, gt=0, le=0.05, description="GSPF: share of the target weights selected")
    scope: Literal["global", "per_module"] = Field("global", description="GSPF: top-p over all modules or per module")
    warmup_steps: int = Field(8, ge=1, description="GSPF: sensitivity warm-up batches")
    reselect_every: int = Field(5, ge=0, description="GSPF: re-select every N epochs (0 = static mask)")
    target_modules: list[str] | None = Field(None, description="name fragments of linear layers to train (default: all)")
    lora_rank: int = Field(16, ge=1, description="LoRA: rank")
    seed: int = Field(0, description="random seed")
    device: str = Field("auto", description="cpu, cuda, or auto")
    storage: StorageOptions = Field(default_factory=StorageOptions)
