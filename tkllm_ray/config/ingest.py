"""The ingest job's config: one model, loadable from YAML, also the CLI's options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tkllm_ray.config.base import ConfigModel
from tkllm_ray.config.storage import StorageOptions

Mode = Literal["tiny", "base", "hifi"]


class InputSpec(ConfigModel):
    uri: str = Field(description="file, directory or s3:// prefix of posts (JSONL/JSON/CSV/TSV/Parquet, .gz ok)")
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet"] = Field(
        "auto", description="input format; auto = by file extension")
    timestamp_unit: Literal["auto", "s", "ms", "us", "ns", "ks"] = Field(
        "auto", description="unit of numeric timestamps; auto infers s/ms/us/ns from magnitude")
    field_map: dict[str, str] = Field(
        default_factory=dict, description="canonical field -> source column, overriding the built-in aliases")

    @field_validator("field_map")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        from tkllm_ray.data.fields import ALIASES

        unknown = set(v) - set(ALIASES)
        if unknown:
            raise ValueError(f"unknown canonical field(s) {sorted(unknown)}; known: {sorted(ALIASES)}")
        return v


class RenderConfig(ConfigModel):
    enabled: bool = Field(True, description="render context images (optical context)")
    modes: list[Mode] = Field(["tiny", "base", "hifi"], description="OCC modes: tiny 512px, base 1024px, hifi 1280px")
    num_buckets: int = Field(3, ge=1, le=8, description="temporal buckets of the forgetting pyramid")
    first_bucket_posts: int = Field(8, ge=1, description="posts in the newest bucket; bucket k holds this x 2^k")
    summary: bool = Field(True, description="collapse posts older than the last bucket into a style-summary image")
    actors: int = Field(2, ge=1, description="size of the rendering actor pool")
    fonts: list[str] | None = Field(None, description="font files in fallback order (default: DejaVu, WenQuanYi, Noto Color Emoji)")


def inputs_as_strings(data):
    """`inputs: [a.csv, s3://b/]` is shorthand for [{uri: a.csv}, {uri: s3://b/}]."""
    if isinstance(data, dict) and isinstance(data.get("inputs"), list):
        data = dict(data, inputs=[{"uri": i} if isinstance(i, str) else i for i in data["inputs"]])
    return data


class IngestConfig(ConfigModel):
    inputs: list[InputSpec] = Field(description="where the raw posts are")
    output: str = Field(description="dataset root (path or s3://); versions are published under it")
    tokenizer: str = Field("builtin", description="'builtin' (shipped BPE), or a Hugging Face tokenizer dir, local or s3://")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="newest share of each account's posts held out for eval")
    min_posts: int = Field(20, ge=2, description="accounts with fewer posts (after dedupe) are reported and skipped")
    max_text_chars: int = Field(10_000, ge=1, description="longer posts are quarantined as too_long")
    min_year: int = Field(2005, ge=1970, description="posts dated before this year are quarantined as bad_timestamp")
    render: RenderConfig = Field(default_factory=RenderConfig)
    shuffle_partitions: int = Field(4, ge=1, description="partitions of the per-account shuffle (raise for many accounts)")
    tokenize_actors: int = Field(1, ge=1, description="size of the tokenizer actor pool")
    ray_address: str | None = Field(None, description="Ray cluster address; default: start or join a local one")
    accounts: list[str] | None = Field(None, description="ingest only these accounts' posts (scheduled retraining "
                                       "re-ingests the accounts whose posts changed); default: every account")
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @field_validator("accounts")
    @classmethod
    def _valid_account_ids(cls, v):
        if v is not None:
            from tkllm_ray.data.schema import validate_account_id

            for a in v:
                validate_account_id(a)
        return v

    @model_validator(mode="before")
    @classmethod
    def _inputs_as_strings(cls, data):
        return inputs_as_strings(data)

    @field_validator("inputs")
    @classmethod
    def _some_inputs(cls, v):
        if not v:
            raise ValueError("give at least one input")
        return v
