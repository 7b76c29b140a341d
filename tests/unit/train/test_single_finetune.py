"""`tkllm finetune` for one account on the tiny model, from a dataset in the ingest layout."""

import json
from pathlib import Path

import pytest
import torch

from tkllm_ray.cli.main import main
from tkllm_ray.data.tokenizer import cached_tokenizer
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.sparse.delta_store import load_delta
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.train.data import account_posts, pack
from tkllm_ray.train.single import perplexity


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ingested_dataset):
    """Two synthetic accounts written as `tkllm ingest` writes them (train/eval, hive-partitioned)."""
    return ingested_dataset(str(tmp_path_factory.mktemp("ds")), accounts=2, posts=60, train=48)


def _result(out: str) -> dict:
    # DeepSpeed (imported by transformers' save path) prints an accelerator warning to stdout.
    r = json.loads(out[out.index("{\n"):])
    # Every method reports its costs: fp32 params + grads + two AdamW moments (+ step counters); no
    # peak memory on the CPU (not measured, so not reported as a number).
    assert r["trainable_params"] > 0 and r["step_time_s"] > 0 and r["train_time_s"] > 0
    assert 16 * r["trainable_params"] <= r["train_state_bytes"] < 17 * r["trainable_params"]
    assert r["peak_memory_bytes"] is None
    return r


def _linear_entries(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_pack_closes_posts_with_eos_and_masks_padding():
    ids, labels = pack([[5, 6], [7]], eos_id=0, seq_len=4)
    assert ids.tolist() == [[5, 6, 0, 7], [0, 0, 0, 0]]
    assert labels.tolist() == [[5, 6, 0, 7], [0, -100, -100, -100]]


def test_gspf_finetune_publishes_a_delta_that_lowers_heldout_perplexity(dataset, tmp_path, capsys):
    root, accounts = dataset
    store = str(tmp_path / "deltas")
    code = main(["finetune", "--account", accounts[0], "--data", root, "--method", "gspf", "--output", store,
                 "--epochs", "4", "--lr", "0.02", "--density", "0.01", "--reselect-every", "2", "--seq-len", "64",
                 "--json"])
    assert code == 0
    r = _result(capsys.readouterr().out)
    assert r["eval_ppl_after"] < 0.8 * r["eval_ppl_before"]
    assert len(r["reselection"]) == 2 and r["reselection"][1]["overlap"] is not None
    base = build_model("tkllm-tiny", vocab_size=8192, seed=0)
    delta, manifest = load_delta(store, accounts[0], base_fingerprint=fingerprint(base))
    assert manifest["method"] == "gspf" and manifest["metrics"]["eval_ppl_after"] == r["eval_ppl_after"]
    vdir = tmp_path / "deltas" / accounts[0] / r["version"]
    assert (vdir / "placement.png").stat().st_size > 1000
    assert sum(map(sum, json.loads((vdir / "placement.json").read_text())["count"])) == r["trainable_params"]
    k = sum(i.numel() for i, _ in delta.values())
    assert k == r["trainable_params"] == round(0.01 * _linear_entries(base))


def test_diffpruning_publishes_the_projected_delta_it_evaluated(dataset, tmp_path, capsys):
    root, accounts = dataset
    store = str(tmp_path / "deltas")
    assert main(["finetune", "--account", accounts[0], "--data", root, "--method", "diffpruning", "--output", store,
                 "--epochs", "2", "--lr", "0.01", "--density", "0.01", "--seq-len", "64", "--json"]) == 0
    r = _result(capsys.readouterr().out)
    base = build_model("tkllm-tiny", vocab_size=8192, seed=0)
    n = _linear_entries(base)
    delta, manifest = load_delta(store, accounts[0], base_fingerprint=fingerprint(base))
    assert manifest["method"] == "diffpruning" and sum(i.numel() for i, _ in delta.values()) == round(0.01 * n)
    assert r["trainable_params"] == 2 * n  # while training: a dense delta and a gate per target entry
    AppliedDelta(base, delta)
    ids, labels = pack(account_posts(root, accounts[0], "eval"), cached_tokenizer().eos_token_id, 64)
    assert perplexity(base, ids, labels, 8) == r["eval_ppl_after"] < r["eval_ppl_before"]


EXPORTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors", "adapter": "adapter.safetensors"}


@pytest.mark.parametrize("method", sorted(EXPORTS))
def test_baselines_train_and_export(dataset, tmp_path, method, capsys):
    root, accounts = dataset
    assert main(["finetune", "--account", accounts[1], "--data", root, "--method", method, "--epochs", "1",
                 "--output", str(tmp_path / "out"), "--seq-len", "64", "--lora-rank", "4", "--adapter-bottleneck", "8",
                 "--json"]) == 0
    r = _result(capsys.readouterr().out)
    assert r["model_uri"].startswith(str(tmp_path / "out" / accounts[1] / method))  # a new version dir per run
    files = {p.name for p in Path(r["model_uri"]).iterdir()}
    assert EXPORTS[method] in files
    assert r["eval_ppl_after"] < r["eval_ppl_before"]


def test_unknown_account_is_a_clear_error(dataset, capsys):
    root, _ = dataset
    assert main(["finetune", "--account", "nobody", "--data", root]) == 1
    assert "account 'nobody' has no train posts" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora"])
def test_token_selective_finetune_reports_rates_and_its_adapters_reload(dataset, tmp_path, method, capsys):
    from tkllm_ray.train.ts_artifacts import load_ts

    root, accounts = dataset
    assert main(["finetune", "--account", accounts[1], "--data", root, "--method", method, "--epochs", "6",
                 "--lr", "0.01", "--output", str(tmp_path / "out"), "--seq-len", "64", "--lora-rank", "4",
                 "--ts-target-rate", "0.6", "--ts-penalty", "5", "--ts-tau-lr", "0.3", "--json"]) == 0
    r = _result(capsys.readouterr().out)
    assert r["eval_ppl_after"] < r["eval_ppl_before"]
    ts = r["token_selective"]
    for phase in ("train", "eval"):  # tokens that took their update, in training and at inference
        assert 0 < ts[phase]["activation_rate"] < 1 and len(ts[phase]["per_module"]) == len(ts[phase]["tau"])
    assert (ts["eval"]["skipped_flops"] > 0) == (method == "ts-lora")
    files = {p.name for p in Path(r["model_uri"]).iterdir()}
    assert {"adapter.safetensors", "ts_config.json", "rates.png", "manifest.json", "_COMPLETE"} <= files
    assert (tmp_path / "out" / accounts[1] / "LATEST").read_text() == r["version"]  # the delta store's layout
    # served as saved: a fresh base with the adapters reloaded gives the published perplexity
    base = build_model("tkllm-tiny", vocab_size=8192, seed=0)
    load_ts(base, r["model_uri"], base_fingerprint=fingerprint(base))
    ids, labels = pack(account_posts(root, accounts[1], "eval"), cached_tokenizer().eos_token_id, 64)
    assert perplexity(base, ids, labels, 8) == pytest.approx(r["eval_ppl_after"], rel=1e-5)
