"""The fine-tune job's config (`tkllm finetune`): one account, or many packed on Ray Train workers."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tkllm_ray.config.base import ConfigModel
from tkllm_ray.config.storage import StorageOptions


PACKED_METHODS = ("gspf", "ts-lora", "ts-dora", "dora")  # what the packed engines train (train/packed*.py)


class FinetuneConfig(ConfigModel):
    account: str | None = Field(None, description="one account id to fine-tune (or --accounts)")
    accounts: str | None = Field(None, description="many accounts, packed on Ray Train workers: 'all' (every "
                                 "account of the dataset) or a file/URI with one account id per line")
    data: str = Field(description="ingested dataset root (path or s3://), as written by `tkllm ingest`")
    method: Literal["gspf", "full", "lora", "dora", "adapter", "diffpruning", "ts-lora", "ts-dora"] = Field(
        "gspf", description="fine-tuning method (ts-lora, ts-dora: token-selective, train/ts_peft.py; dora: "
        "ts-dora's adapters with the gate held open)")
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
    target_modules: list[str] | None = Field(None, description="GSPF, DiffPruning, LoRA, DoRA, TS-*: name fragments "
                                             "of linear layers to train (default: all)")
    lora_rank: int = Field(16, ge=1, description="LoRA, DoRA, TS-LoRA, TS-DoRA: rank")
    ts_target_rate: float = Field(0.5, gt=0, le=1, description="TS-LoRA/DoRA: target share of tokens a layer updates")
    ts_penalty: float = Field(1.0, ge=0, description="TS-LoRA/DoRA: weight of the penalty (rate - target)^2 per layer")
    ts_tau_lr: float = Field(0.05, gt=0, description="TS-LoRA/DoRA: threshold step, as a share of the layer's "
                             "median update ratio")
    ts_bandwidth: float = Field(0.5, gt=0, description="TS-LoRA/DoRA: half-width of the gate's smoothing kernel, "
                                "as a share of the median update ratio")
    adapter_bottleneck: int = Field(16, ge=1, le=4096, description="Adapter: bottleneck width (hidden -> N -> hidden) "
                                    "of the adapters after each attention and MLP output")
    diffpruning_l0: float = Field(1.0, ge=0, le=1000, description="DiffPruning: weight λ of the L0 penalty, the "
                                  "expected share of open gates (0 = no penalty)")
    diffpruning_mask_epochs: int = Field(1, ge=0, description="DiffPruning: final epochs trained on the fixed "
                                         "projected mask (Guo et al.; 0 = ship the projection as is)")
    diffpruning_alpha_init: float = Field(5.0, ge=-10, le=10, description="DiffPruning: initial gate log-alpha "
                                          "(5: every gate starts almost surely open)")
    workers: int = Field(1, ge=1, description="packed: Ray Train workers (each loads the base once)")
    gpus_per_worker: float = Field(0, ge=0, description="packed: GPUs per worker (0: CPU workers)")
    max_resident: int = Field(64, ge=1, description="packed: accounts a worker keeps in training at once")
    max_rows: int = Field(64, ge=1, description="packed: rows per mixed-account micro-batch")
    state_memory_gb: float | None = Field(None, gt=0, description="packed: memory budget of a worker's resident "
                                          "account states (estimated; default: only max_resident limits)")
    host_state_memory_gb: float | None = Field(None, gt=0, description="packed: pinned host memory for account "
                                               "states paged out of the state_memory_gb budget (default: no "
                                               "paging, accounts wait for device memory)")
    checkpoint_every: int = Field(10, ge=0, description="packed: per-account checkpoint every N of its steps (0: off)")
    zero3: bool = Field(False, description="packed: shard the frozen base across the workers with DeepSpeed "
                        "ZeRO-3 (bases larger than one GPU); each worker still trains its own accounts")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="packed: dtype of the base weights "
                                                          "(auto: bfloat16 on GPU workers, float32 on CPU)")
    max_failures: int = Field(2, ge=0, description="packed: worker-group restarts Ray Train allows")
    run_dir: str | None = Field(None, description="packed: where the run keeps checkpoints and results "
                                "(default: {output}/_runs/{run id})")
    run_id: str | None = Field(None, description="packed: the run's id (default: a fresh one). A rerun with the "
                               "same id and run_dir resumes it: accounts it published are skipped")
    watermarks: str | None = Field(None, description="packed: JSON file {account: data watermark} recorded in each "
                                   "published manifest (scheduled retraining compares them with the posts)")
    seed: int = Field(0, description="random seed")
    device: str = Field("auto", description="cpu, cuda, or auto")
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @model_validator(mode="after")
    def _one_way_to_name_accounts(self):
        if (self.account is None) == (self.accounts is None):
            raise ValueError("give either account (one) or accounts ('all' or a file of ids)")
        if self.accounts is not None and self.method not in PACKED_METHODS:
            raise ValueError(f"packed training (accounts) runs {', '.join(PACKED_METHODS)}; {self.method!r} "
                             "fine-tunes one account at a time")
        if self.zero3 and self.method != "gspf":
            raise ValueError(f"zero3 runs packed GSPF over a sharded base; {self.method!r} needs the whole base per worker")
        if self.zero3 and self.accounts is None:
            raise ValueError("zero3 shards the base over packed workers: name the accounts (accounts=...), not one account")
        return self

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_name(cls, v):
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError(f"run_id {v!r}: letters, digits, '_', '.', '-', at most 64 characters")
        return v

    @model_validator(mode="after")
    def _paging_pages_against_a_budget(self):
        if self.host_state_memory_gb is not None and self.state_memory_gb is None:
            raise ValueError("host_state_memory_gb pages states out of a device budget: set state_memory_gb too")
        return self

    @property
    def packed(self) -> bool:
        return self.accounts is not None

    @model_validator(mode="after")
    def _mask_epochs_leave_gated_training(self):
        if self.method == "diffpruning" and self.diffpruning_mask_epochs >= self.epochs:
            raise ValueError(f"diffpruning_mask_epochs ({self.diffpruning_mask_epochs}) must be below epochs "
                             f"({self.epochs}): the gates need at least one epoch before the projection")
        return self
