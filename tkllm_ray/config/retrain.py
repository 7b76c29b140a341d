"""The scheduled retraining job's config (`tkllm retrain`, `python -m pipelines.retrain`)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from tkllm_ray.config.base import ConfigModel, format_validation_error
from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.config.ingest import IngestConfig, InputSpec, inputs_as_strings
from tkllm_ray.config.storage import StorageOptions

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Set by the pipeline for each tick: a config naming them would be overridden silently.
FINETUNE_SET = {"account", "accounts", "data", "output", "run_id", "run_dir", "watermarks", "storage"}
INGEST_SET = {"inputs", "output", "accounts", "storage", "ray_address"}


def seconds(every: str) -> int:
    """'90s', '15m', '6h', '1d' -> seconds."""
    m = re.fullmatch(r"(\d+)([smhd])", every)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"invalid interval {every!r}: a positive number and a unit s, m, h or d (e.g. 1d, 6h)")
    return int(m.group(1)) * UNITS[m.group(2)]


class RetrainConfig(ConfigModel):
    inputs: list[InputSpec] = Field(description="where the raw posts are (the same exports, grown since last time)")
    deltas: str = Field(description="the delta store: versions are published here and compared against")
    work: str = Field(description="the job's own state: {work}/datasets (one dataset version a tick), "
                      "{work}/runs/{tick} (fine-tune checkpoints), {work}/reports/{tick}.json")
    finetune: dict[str, Any] = Field(default_factory=dict, description="FinetuneConfig options of the packed "
                                     "fine-tune (model, tokenizer, density, epochs, workers, ...)")
    ingest: dict[str, Any] = Field(default_factory=lambda: {"render": {"enabled": False}},
                                   description="IngestConfig options of the re-ingest (tokenizer, eval_fraction, "
                                   "min_posts, render, ...); context images off unless enabled")
    keep_versions: int = Field(3, ge=1, description="versions kept per retrained account (LATEST always stays)")
    every: str = Field("1d", description="schedule interval; a tick is the run for one interval, named by its start")
    tick: str | None = Field(None, description="run this tick (e.g. 20261124T000000Z) instead of the current one")
    ray_address: str | None = Field(None, description="Ray cluster address; default: start or join a local one")
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @model_validator(mode="before")
    @classmethod
    def _inputs_as_strings(cls, data):
        return inputs_as_strings(data)

    @field_validator("every")
    @classmethod
    def _interval(cls, v):
        seconds(v)
        return v

    @field_validator("tick")
    @classmethod
    def _tick(cls, v):
        if v is not None and not re.fullmatch(r"\d{8}T\d{6}Z", v):
            raise ValueError(f"tick {v!r}: YYYYMMDDTHHMMSSZ (UTC), e.g. 20261124T000000Z")
        return v

    @model_validator(mode="after")
    def _sub_configs_validate(self):
        for name, given, reserved in (("finetune", self.finetune, FINETUNE_SET), ("ingest", self.ingest, INGEST_SET)):
            clash = sorted(set(given) & reserved)
            if clash:
                raise ValueError(f"{name}: {clash} are set by the retrain job for each tick; remove them")
        try:  # the same checks the real configs get at each tick, now rather than on the cluster at midnight
            self.finetune_config(accounts="all", data="-", run_id="check", run_dir=None, watermarks=None)
            self.ingest_config(output="-", accounts=None)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, "(retrain sub-config)")) from None
        return self

    def finetune_config(self, **set_by_job) -> FinetuneConfig:
        return FinetuneConfig.model_validate({"method": "gspf", **self.finetune, "output": self.deltas,
                                              "storage": self.storage.model_dump(), **set_by_job})

    def ingest_config(self, **set_by_job) -> IngestConfig:
        return IngestConfig.model_validate({**self.ingest, "inputs": [i.model_dump() for i in self.inputs],
                                            "storage": self.storage.model_dump(), "ray_address": self.ray_address,
                                            **set_by_job})
