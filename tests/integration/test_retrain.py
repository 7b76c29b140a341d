"""Scheduled retraining on real local Ray: a tick trains every account; rerunning it does nothing;
after one account gains posts the next tick retrains that account only (new version, its parent
and watermark recorded); rolling that account back makes a serving delta cache swap back to the
version it served before."""

import json
import os

import pytest

from tkllm_ray.config.retrain import RetrainConfig
from tkllm_ray.data.synth import generate_records, write_jsonl
from tkllm_ray.orchestrate import registry
from tkllm_ray.orchestrate.retrain import run_retrain
from tkllm_ray.serve.delta_cache import DeltaCache

pytestmark = pytest.mark.ray

FINETUNE = dict(model="tkllm-tiny", epochs=1, density=0.01, seq_len=64, batch_size=8, warmup_steps=1, workers=1,
                max_resident=4, max_rows=32, checkpoint_every=0, reselect_every=0)


def _posts(tmp_path, records, name):
    path = str(tmp_path / "raw" / name)
    write_jsonl(records, path)
    return path


def test_retrain_only_changed_accounts_then_roll_back(tmp_path, ray_local):
    records = generate_records(n_accounts=3, posts_per_account=48, seed=3)
    by_account: dict[str, list] = {}
    for r in sorted(records, key=lambda r: r["createTime"]):
        by_account.setdefault(r["authorMeta"]["name"], []).append(r)
    names = sorted(by_account)
    grower = names[1]
    first = [r for a in names for r in by_account[a][:40]]
    raw = _posts(tmp_path, first, "posts.jsonl")
    cfg = RetrainConfig(inputs=[raw], deltas=str(tmp_path / "deltas"), work=str(tmp_path / "work"),
                        finetune=FINETUNE, ingest={"min_posts": 20, "render": {"enabled": False}},
                        tick="20261124T000000Z")

    report = run_retrain(cfg, progress=False)
    assert report["changed"] == report["retrained"] == names and report["unchanged"] == []
    v1 = {a: registry.show(cfg.deltas, a) for a in names}
    assert all(v.manifest["data_watermark"].endswith("/40") for v in v1.values())
    assert os.path.exists(tmp_path / "work" / "reports" / "20261124T000000Z.json")

    again = run_retrain(cfg, progress=False)  # the same tick: done already
    assert again["already_done"] and all(len(registry.versions(cfg.deltas, a)) == 1 for a in names)

    # The grower posts 8 more; the file is re-exported in full, as a platform export would be.
    _posts(tmp_path, first + by_account[grower][40:], "posts.jsonl")
    cfg2 = cfg.model_copy(update={"tick": "20261125T000000Z"})
    report2 = run_retrain(cfg2, progress=False)
    assert report2["changed"] == report2["retrained"] == [grower]
    assert report2["unchanged"] == [a for a in names if a != grower]
    for a in names:
        found = registry.versions(cfg.deltas, a)
        if a == grower:
            assert len(found) == 2 and found[1].latest
            assert found[1].manifest["parent_version"] == v1[a].version
            assert found[1].manifest["data_watermark"].endswith("/48")
            assert found[1].manifest["run_id"] == "retrain-20261125T000000Z"
        else:
            assert [v.version for v in found] == [v1[a].version]  # untouched
    assert run_retrain(cfg2.model_copy(update={"tick": "20261126T000000Z"}), progress=False)["retrained"] == []

    # Rollback: a serving cache that holds the new version swaps back to the old one.
    cache = DeltaCache(cfg.deltas)
    new = registry.show(cfg.deltas, grower).version
    assert cache.get(grower).version == new
    assert registry.rollback(cfg.deltas, grower) == (new, v1[grower].version)
    for fut in cache.refresh():
        fut.result()
    assert cache.get(grower).version == v1[grower].version
    cache.close()
    # The schedule keeps the rollback: no new posts, nothing retrained, the old version still served.
    later = run_retrain(cfg2.model_copy(update={"tick": "20261127T000000Z"}), progress=False)
    assert later["retrained"] == [] and registry.show(cfg.deltas, grower).version == v1[grower].version
    saved = json.loads((tmp_path / "work" / "reports" / "20261125T000000Z.json").read_text())
    assert saved["versions"] == {grower: new}
