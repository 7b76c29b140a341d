"""Named base-model presets on the Llama architecture, and a stable fingerprint of base weights.

`tkllm-tiny` is for CPU tests and the quickstart; `tkllm-s/m/l` (~1.3B/3B/7B) are the GPU sizes.
Random init from a config: weights come from training (or `from_pretrained` on a local/S3 dir).
`PRETRAINED` names real pretrained bases, each a function giving its (cached, local) HF directory.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

from tkllm_ray.errors import TkllmError
from tkllm_ray.models.smollm2 import smollm2_dir

PRESETS: dict[str, dict] = {
    "tkllm-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512),
    "tkllm-s": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                    num_key_value_heads=16, max_position_embeddings=2048),
    "tkllm-m": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=20,
                    num_key_value_heads=20, max_position_embeddings=2048),
    "tkllm-l": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=2048),
}

PRETRAINED = {"smollm2-135m": smollm2_dir}


def pretrained_dir(name: str) -> str | None:
    """The local model directory of a named pretrained base (its tokenizer included), else None."""
    return PRETRAINED[name]() if name in PRETRAINED else None


def check_vocab(model: torch.nn.Module, vocab_size: int, model_name: str, tokenizer_name: str) -> None:
    """Refuse a tokenizer whose ids run past the model's embedding table (an index error deep in
    the forward pass otherwise)."""
    rows = model.get_input_embeddings().num_embeddings
    if vocab_size > rows:
        raise TkllmError(f"tokenizer {tokenizer_name!r} has {vocab_size} tokens but model {model_name!r} embeds only "
                         f"{rows}: pass the model's own tokenizer (--tokenizer {model_name})")


def preset_config(name: str, vocab_size: int = 8192):
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise TkllmError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)} or give a model directory")
    return LlamaConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                       tie_word_embeddings=False, rms_norm_eps=1e-5, **PRESETS[name])


def build_model(name: str, vocab_size: int = 8192, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu"):
    """A randomly initialised preset, deterministic for `seed` on a given device type (a GPU
    build is fast for the 1.3B-7B sizes but draws other numbers than a CPU build)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(preset_config(name, vocab_size))
    return model.to(dtype)


@torch.no_grad()
def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes, in name order: two bases
    with the same fingerprint are bit-identical, so a delta trained on one applies to the other."""
    return fingerprint_of(sorted(model.state_dict().items()))


@torch.no_grad()
def fingerprint_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """The fingerprint of (name, tensor) pairs given in name order, each hashed as it arrives
    (a sharded base hands them over one gathered parameter at a time: train/zero3.py)."""
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        t = t.detach().contiguous().cpu()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()
