"""The serving app's config (`tkllm serve`, and the `args` of cluster/serve.yaml for `serve deploy`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tkllm_ray.config.base import ConfigModel
from tkllm_ray.config.storage import StorageOptions


class ServeConfig(ConfigModel):
    model: str = Field(description="base: a preset (tkllm-tiny/s/m/l) or a Hugging Face model directory (path or s3://)")
    tokenizer: str = Field("builtin", description="tokenizer: 'builtin' or a Hugging Face tokenizer directory")
    deltas: str = Field(description="delta store root (path or s3://), as fine-tuning publishes it")
    base_name: str | None = Field(None, description="the name requests use in `model` (default: the model's last "
                                                     "path component)")
    keys_file: str | None = Field(None, description="JSON file of hashed API keys (see tkllm_ray/serve/api.py); "
                                                    "required unless allow_anonymous")
    allow_anonymous: bool = Field(False, description="serve without API keys (local development only)")
    experts: str | None = Field(None, description="style experts root (path or s3://; see "
                                                   "tkllm_ray/serve/experts.py), served beside the deltas")
    device: str = Field("cpu", description="cpu or cuda")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="base weights and deltas on the "
                                                          "replica (auto: bfloat16 on cuda, float32 on cpu)")
    device_cache_mb: int = Field(1024, ge=1, description="per replica: deltas kept on the device")
    host_cache_mb: int = Field(4096, ge=1, description="per replica: deltas kept in host memory")
    host_prefetch: bool = Field(True, description="on start, read the store's most recently published accounts "
                                "into host memory (until host_cache_mb is full), so their first requests copy "
                                "from there instead of reading the store")
    layout_cache_mb: int = Field(2048, ge=0, description="per replica, on a GPU: recent accounts' deltas as the "
                                 "decode slots lay them out, kept for their next request (0: lay out every time)")
    max_batch: int = Field(16, ge=1, le=1024, description="requests decoding at once (KV-cache slots per replica)")
    max_seq_len: int | None = Field(None, ge=8, description="tokens per request (prompt + generated) the KV cache "
                                    "holds; default: the base's context length")
    compile_decode: bool = Field(False, description="on a GPU, torch.compile the decode step before its CUDA "
                                 "graph is captured (H100: ~1.7x the base decode rate; each new attention span "
                                 "compiles once, ~30 s)")
    prefill_graph_tokens: int = Field(4096, ge=0, description="on a GPU, prefills of up to this many tokens "
                                      "(requests x prompt width, rounded up to their bucket) replay a CUDA graph per "
                                      "bucket, captured at its first use; larger ones run eagerly (0: always eagerly)")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="how long an idle replica waits to prefill arrivals together")
    refresh_s: float = Field(5.0, gt=0, description="how often a replica checks for newly published versions")
    host: str = Field("127.0.0.1", description="tkllm serve: HTTP address")
    port: int = Field(8000, ge=1, le=65535, description="tkllm serve: HTTP port")
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @model_validator(mode="after")
    def _keys_or_anonymous(self):
        if self.keys_file is None and not self.allow_anonymous:
            raise ValueError("give keys_file (hashed API keys) or set allow_anonymous: true (local development only)")
        return self
