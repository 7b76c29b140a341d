"""Packed fine-tuning over a base sharded with DeepSpeed ZeRO-3: real local Ray Train, 2 CPU workers
(gloo), the tiny base partitioned between them. An odd number of accounts, so one worker runs
out first and must keep joining the other's collectives (idle passes). Each account's delta and
held-out perplexities equal the unsharded packed run's; the manifest names the unsharded base."""

import pytest
import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.config.ingest import IngestConfig
from tkllm_ray.data.ingest import run_ingest
from tkllm_ray.data.tokenizer import cached_tokenizer
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.sparse.delta_store import load_delta
from tkllm_ray.train.data import list_accounts
from tkllm_ray.train.packed_job import run_packed_finetune

pytestmark = pytest.mark.ray

SETTINGS = dict(method="gspf", epochs=2, reselect_every=1, density=0.01, seq_len=64, batch_size=8, warmup_steps=2,
                lr=1e-2, workers=2, max_resident=2, max_rows=24, checkpoint_every=0)


def test_zero3_packed_run_matches_the_unsharded_run(tmp_path, ray_local, shared_data):
    sample = shared_data / "accounts-dev.jsonl"
    if not sample.is_file():
        pytest.skip(f"{sample} is absent")
    pytest.importorskip("deepspeed")
    root = str(tmp_path / "ds")
    run_ingest(IngestConfig(inputs=[{"uri": str(sample)}], output=root, render={"enabled": False}), progress=False)
    accounts_file = tmp_path / "accounts.txt"
    accounts_file.write_text("\n".join(list_accounts(root)[:5]) + "\n")

    runs = {}
    for zero3 in (True, False):
        out = str(tmp_path / f"deltas-{zero3}")
        cfg = FinetuneConfig(accounts=str(accounts_file), data=root, output=out, zero3=zero3, **SETTINGS)
        runs[zero3] = (out, run_packed_finetune(cfg, progress=False))

    (out3, sharded), (out1, plain) = runs[True], runs[False]
    assert sharded["accounts"] == plain["accounts"] == 5
    base_fp = fingerprint(build_model("tkllm-tiny", vocab_size=len(cached_tokenizer()), seed=0))
    mine = {r["account"]: r for r in plain["per_account"]}
    for r in sharded["per_account"]:
        assert r["zero3"] is True
        ref = mine[r["account"]]
        # evaluated on the mixed path (sharded) vs the exact scatter path: the same model
        assert r["eval_ppl_before"] == pytest.approx(ref["eval_ppl_before"], rel=1e-4)
        assert r["eval_ppl_after"] == pytest.approx(ref["eval_ppl_after"], rel=1e-3)
        assert r["eval_ppl_after"] < r["eval_ppl_before"]
        delta, manifest = load_delta(out3, r["account"])
        ref_delta, _ = load_delta(out1, r["account"])
        assert manifest["base_fingerprint"] == base_fp  # gathered shards hash like the whole base
        assert sorted(delta) == sorted(ref_delta)
        for name, (idx, vals) in delta.items():
            assert torch.equal(idx, ref_delta[name][0])
            torch.testing.assert_close(vals.float(), ref_delta[name][1].float(), rtol=1e-2, atol=1e-4)
