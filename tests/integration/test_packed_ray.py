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
