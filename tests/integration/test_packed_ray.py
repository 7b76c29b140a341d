"""Packed fine-tuning on real local Ray Train: the 20 real accounts of accounts-dev.jsonl ingested by
the real ingest job, 2 CPU workers, one of them killed mid-run; every account ends with exactly one
delta from the run, equal (to float tolerance) to the delta it gets when trained alone."""

import copy
import os

import pytest
import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.config.ingest import IngestConfig
from tkllm_ray.data.ingest import run_ingest
from tkllm_ray.data.tokenizer import cached_tokenizer
from tkllm_ray.models import build_model
from tkllm_ray.sparse.delta_store import load_delta
from tkllm_ray.train.data import account_posts
from tkllm_ray.train.packed_job import FAULT_ENV, run_packed_finetune
from tkllm_ray.train.single import train_account

pytestmark = pytest.mark.ray

SETTINGS = dict(method="gspf", epochs=2, reselect_every=0, density=0.01, seq_len=64, batch_size=8, warmup_steps=2,
                lr=1e-2, workers=2, max_resident=6, max_rows=32, checkpoint_every=3, max_failures=3)


def test_packed_run_survives_a_killed_worker(tmp_path, ray_local, shared_data, monkeypatch):
    sample = shared_data / "accounts-dev.jsonl"
    if not sample.is_file():
        pytest.skip(f"{sample} is absent")
    root = str(tmp_path / "ds")
    run_ingest(IngestConfig(inputs=[{"uri": str(sample)}], output=root, render={"enabled": False}), progress=False)
    out = str(tmp_path / "deltas")
    cfg = FinetuneConfig(accounts="all", data=root, output=out, **SETTINGS)
    monkeypatch.setenv(FAULT_ENV, "4")  # the first worker to reach 4 packed steps exits hard, once
    summary = run_packed_finetune(cfg, progress=False)

    accounts = [r["account"] for r in summary["per_account"]]
    assert summary["accounts"] == len(accounts) == 20
    assert os.path.exists(os.path.join(summary["run_dir"], "fault-injected"))  # the kill did happen
    base = build_model("tkllm-tiny", vocab_size=len(cached_tokenizer()), seed=0)
    eos = cached_tokenizer().eos_token_id
    for acct in accounts:
        versions = [d for d in os.listdir(os.path.join(out, acct)) if not d.startswith(("LATEST", "_"))]
        assert len(versions) == 1, (acct, versions)  # exactly one published delta
        delta, manifest = load_delta(out, acct)
        assert manifest["run_id"] == summary["run_id"]
        solo_cfg = FinetuneConfig(account=acct, data=root, output=out, **{k: v for k, v in SETTINGS.items()
                                                                            if k in FinetuneConfig.model_fields})
        solo_cfg = solo_cfg.model_copy(update={"accounts": None})
        solo = train_account(solo_cfg, copy.deepcopy(base), eos, account_posts(root, acct, "train"),
                             account_posts(root, acct, "eval"), progress=False).delta
        assert sorted(delta) == sorted(solo)
        for name, (idx, vals) in delta.items():
            assert torch.equal(idx, solo[name][0])
            # published in bf16: compare at that precision
            torch.testing.assert_close(vals.float(), solo[name][1].to(torch.bfloat16).float(), rtol=1e-2, atol=1e-4)


def test_packed_token_selective_run_on_ray_train(tmp_path, ray_local):
    """--method ts-lora with --accounts: the packed token-selective engine on a Ray Train worker;
    each account's published adapters, loaded onto the base, give the held-out perplexity the run
    reported (what a server loading them computes)."""
    from tkllm_ray.data.synth import generate_records, write_jsonl
    from tkllm_ray.train import ts_artifacts
    from tkllm_ray.train.data import pack
    from tkllm_ray.train.single import perplexity

    raw = str(tmp_path / "raw.jsonl")
    write_jsonl(generate_records(n_accounts=2, posts_per_account=40, seed=5), raw)
    root = str(tmp_path / "ds")
    run_ingest(IngestConfig(inputs=[{"uri": raw}], output=root, render={"enabled": False}), progress=False)
    cfg = FinetuneConfig(accounts="all", data=root, output=str(tmp_path / "out"), method="ts-lora", epochs=2,
                         seq_len=64, batch_size=4, lr=1e-2, lora_rank=4, workers=1, max_resident=2, max_rows=8)
    summary = run_packed_finetune(cfg, progress=False)
    assert summary["accounts"] == 2
    tok = cached_tokenizer()
    for r in summary["per_account"]:
        assert r["method"] == "ts-lora" and 0 < r["token_selective"]["eval"]["activation_rate"] <= 1
        model = build_model("tkllm-tiny", vocab_size=len(tok), seed=0)
        ts_artifacts.load_ts(model, r["model_uri"])
        ids, labels = pack(account_posts(root, r["account"], "eval"), tok.eos_token_id, cfg.seq_len)
        assert perplexity(model, ids, labels, cfg.batch_size) == pytest.approx(r["eval_ppl_after"], rel=1e-4)
