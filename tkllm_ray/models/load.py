"""Load a base model by spec: a random-init preset, a named pretrained base, or a Hugging Face
directory (local or s3://). One place, so training, merging and serving load bases alike."""

from __future__ import annotations

import torch

from tkllm_ray.models.presets import PRESETS, build_model, check_vocab, pretrained_dir


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A config's weight dtype: "float32", "bfloat16", or "auto" (bfloat16 on CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_base_model(spec: str, vocab_size: int, seed: int = 0, device: str | torch.device = "cpu",
                    options=None, tokenizer_name: str = "builtin", dtype: torch.dtype = torch.float32):
    """`vocab_size` is the tokenizer's: presets are built with it; loaded models must cover it."""
    if spec in PRESETS:
        return build_model(spec, vocab_size=vocab_size, seed=seed, dtype=dtype).to(device)
    from transformers import AutoModelForCausalLM

    from tkllm_ray.storage.cache import local_dir

    # a named pretrained base (converted once into the cache), a local dir, or an s3:// prefix cached locally
    path = pretrained_dir(spec) or local_dir(spec, "model directory", options)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    check_vocab(model, vocab_size, spec, tokenizer_name)
    return model.to(device)
