"""The delta registry over a local store: listing, rollback (what LATEST names, what a reader then
loads), gc (never the served version), and the errors a user can hit."""

import time

import pytest
import torch

from tkllm_ray.errors import TkllmError
from tkllm_ray.orchestrate import registry
from tkllm_ray.sparse.delta_store import load_delta, save_delta


def _publish(store, account, value, watermark):
    delta = {"m.weight": (torch.tensor([1, 5]), torch.tensor([value, -value]))}
    v = save_delta(str(store), account, delta, "tkllm-tiny", "sha256:" + "0" * 64, "gspf", 0.003,
                   value_dtype="fp32", data_watermark=watermark, metrics={"eval_ppl_after": 10.0 + value})
    time.sleep(1.1)  # version ids sort by the second they were made
    return v


@pytest.fixture()
def store(tmp_path):
    root = tmp_path / "deltas"
    versions = [_publish(root, "alice", float(i), f"2026-11-2{i}T00:00:00.000000Z/{100 + i}") for i in range(3)]
    _publish(root, "bob", 7.0, None)
    return root, versions


def test_list_show_and_rollback_change_what_a_reader_loads(store):
    root, (v0, v1, v2) = store
    assert registry.accounts(str(root)) == ["alice", "bob"]
    rows = [v.row() for v in registry.versions(str(root), "alice")]
    assert [r["version"] for r in rows] == [v0, v1, v2] and [r["latest"] for r in rows] == [False, False, True]
    assert rows[1]["data_watermark"] == "2026-11-21T00:00:00.000000Z/101" and rows[2]["eval_ppl_after"] == 12.0
    assert registry.show(str(root), "alice").version == v2

    assert registry.rollback(str(root), "alice") == (v2, v1)  # default: the version before the served one
    delta, manifest = load_delta(str(root), "alice")
    assert manifest["version"] == v1 and delta["m.weight"][1].tolist() == [1.0, -1.0]
    assert registry.rollback(str(root), "alice", v2) == (v1, v2)  # forward again, by name
    assert load_delta(str(root), "alice")[1]["version"] == v2


def test_rollback_errors_are_clear(store):
    root, (v0, _, _) = store
    with pytest.raises(TkllmError, match="oldest version, nothing to roll back to"):
        registry.rollback(str(root), "bob")
    with pytest.raises(TkllmError, match="has no complete version '20990101T000000Z-000000'"):
        registry.rollback(str(root), "alice", "20990101T000000Z-000000")
    with pytest.raises(TkllmError, match="no published delta for account 'carol'"):
        registry.versions(str(root), "carol")
    with pytest.raises(TkllmError, match="invalid account id"):
        registry.versions(str(root), "../alice")


def test_gc_keeps_the_newest_and_always_the_served_version(store):
    root, (v0, v1, v2) = store
    registry.rollback(str(root), "alice", v0)  # serving the oldest
    assert registry.gc(str(root), 1, dry_run=True) == {"alice": [v1], "bob": []}
    assert [v.version for v in registry.versions(str(root), "alice")] == [v0, v1, v2]  # dry run: nothing gone
    assert registry.gc(str(root), 1) == {"alice": [v1], "bob": []}
    assert [v.version for v in registry.versions(str(root), "alice")] == [v0, v2]
    assert load_delta(str(root), "alice")[1]["version"] == v0
    with pytest.raises(TkllmError, match="keep must be at least 1"):
        registry.gc(str(root), 0)


def test_tick_is_the_start_of_its_interval():
    from tkllm_ray.orchestrate.retrain import current_tick

    t = 1_795_000_000  # 2026-11-18T11:06:40Z
    assert current_tick("1d", t) == "20261118T000000Z"
    assert current_tick("6h", t) == "20261118T060000Z"
    assert current_tick("15m", t) == "20261118T110000Z"


def test_every_runs_a_tick_per_interval_and_survives_a_failed_one(monkeypatch):
    from tkllm_ray.config.retrain import RetrainConfig
    from tkllm_ray.orchestrate import retrain

    calls, sleeps = [], []

    def tick(cfg, progress=True):
        calls.append(cfg.every)
        if len(calls) == 2:
            raise RuntimeError("S3 was down")
        return {}

    monkeypatch.setattr(retrain, "run_retrain", tick)
    monkeypatch.setattr(retrain.time, "sleep", sleeps.append)
    monkeypatch.setattr(retrain.time, "time", lambda: 86400 * 100 + 3600.0)  # 01:00 on some day
    retrain.run_every(RetrainConfig(inputs=["a"], deltas="d", work="w", every="1d"), max_ticks=3)
    assert calls == ["1d"] * 3
    # after a good tick: until the next midnight (+1 s); after the failed one: a back-off, then retry
    assert sleeps == [86400 - 3600 + 1, 600]
    from tkllm_ray.errors import TkllmError

    with pytest.raises(TkllmError, match="drop tick"):
        retrain.run_every(RetrainConfig(inputs=["a"], deltas="d", work="w", tick="20261124T000000Z"), max_ticks=1)
