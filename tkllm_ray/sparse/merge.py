"""Merge a published sparse delta into its base and save a standalone Hugging Face model
directory (`save_pretrained` + the tokenizer), for users who want a plain model, not a delta."""

from __future__ import annotations

import json
import tempfile

from tkllm_ray.data.tokenizer import load_tokenizer
from tkllm_ray.errors import TkllmError
from tkllm_ray.models import fingerprint
from tkllm_ray.models.load import load_base_model
from tkllm_ray.sparse.delta_store import load_delta
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.storage import write_dir


def merge_delta(store: str, account_id: str, output: str, model: str | None = None, tokenizer: str = "builtin",
                version: str | None = None, seed: int = 0, options=None) -> dict:
    """W + Δ for every module of the delta, saved to `output` (path or s3://). The base is the
    one the manifest names unless `model` overrides it; either way its fingerprint must match."""
    delta, manifest = load_delta(store, account_id, version, options=options)
    spec = model or manifest["base_model"]
    tok = load_tokenizer(tokenizer, options)
    base = load_base_model(spec, len(tok), seed=seed, options=options, tokenizer_name=tokenizer)
    if fingerprint(base) != manifest["base_fingerprint"]:
        raise TkllmError(f"base {spec!r} (seed {seed}) is not the base delta {account_id} was trained on "
                         f"({manifest['base_model']}): pass the same --model, --tokenizer and --seed as the fine-tune")
    missing = [n for n in delta if n not in dict(base.named_modules())]
    if missing:
        raise TkllmError(f"delta modules not in the base: {missing[:3]}")
    AppliedDelta(base, delta)  # in place, kept: this copy of the base becomes the merged model
    info = {"source": f"{store.rstrip('/')}/{account_id}", "version": manifest["version"],
            "method": manifest["method"], "entries": manifest["entries"], "base_model": manifest["base_model"],
            "base_fingerprint": manifest["base_fingerprint"], "merged_fingerprint": fingerprint(base)}
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d, safe_serialization=True)
        tok.save_pretrained(d)
        with open(f"{d}/tkllm_merge.json", "w") as f:
            json.dump(info, f, indent=2)
        write_dir(d, output, options, last=("config.json",))
    return {**info, "output": output}
