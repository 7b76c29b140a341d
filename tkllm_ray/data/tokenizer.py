"""The project's tokenizer (a byte-level BPE shipped in the package) and loading of any
Hugging Face tokenizer directory, local or under s3://. Nothing is downloaded from a hub."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

from tkllm_ray.errors import TkllmError

BUILTIN = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|post|>", "<|account|>"]


def tokenizer_dir(spec: str, options=None) -> str:
    """Local directory holding the tokenizer named by `spec` (builtin, a named pretrained base
    such as smollm2-135m, whose own tokenizer is saved with it, a path, or s3://)."""
    from tkllm_ray.models.presets import pretrained_dir
    from tkllm_ray.storage.cache import local_dir

    if spec == BUILTIN:
        return str(BUILTIN_DIR)
    return pretrained_dir(spec) or local_dir(spec, "tokenizer directory", options)


def load_tokenizer(spec: str = BUILTIN, options=None):
    from transformers import AutoTokenizer

    path = tokenizer_dir(spec, options)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TkllmError(f"cannot load a tokenizer from {spec}: {e}") from None


@lru_cache(maxsize=4)
def cached_tokenizer(spec: str = BUILTIN):
    return load_tokenizer(spec)


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 8192) -> str:
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|pad|>", unk_token=None, additional_special_tokens=SPECIAL_TOKENS[2:],
    )
    fast.model_max_length = 2048
    fast.save_pretrained(out_dir)
    return out_dir
