"""Scheduled batch retraining: one tick retrains exactly the accounts whose posts changed.

A tick (the run for one schedule interval, named by its start: 20261124T000000Z):
1. read and parse every input; each account's data watermark = newest valid post's time / valid
   posts (`account_watermarks`);
2. compare with the watermark in the manifest of the account's newest version: changed = no
   version yet, or a different watermark (new posts, deleted ones); accounts below min_posts are
   reported only; a rolled-back account stays rolled back until its posts change;
3. re-ingest only the changed accounts into {work}/datasets, version = the tick;
4. fine-tune them packed on Ray Train (run id retrain-{tick}, checkpoints in {work}/runs/{tick}),
   each new delta version recording its watermark and its parent version;
5. keep the newest `keep_versions` versions of each retrained account;
6. write {work}/reports/{tick}.json last.
Idempotent and resumable: a tick whose report exists is done; a crashed tick rerun with the same
tick reuses its plan (accounts, watermarks) and published dataset version, and the fine-tune
skips accounts its run id already published and resumes the others from their checkpoints; a
later tick finds the new watermarks in the manifests and retrains nothing twice. A publish racing
an operator's rollback wins (both write LATEST); the registry shows which version is served.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from tkllm_ray.config.retrain import RetrainConfig, seconds
from tkllm_ray.errors import TkllmError
from tkllm_ray.orchestrate import registry
from tkllm_ray.storage import exists, join, read_latest, read_text, write_text


def current_tick(every: str, now: float | None = None) -> str:
    """The start of the interval `now` falls in (UTC, intervals counted from the epoch)."""
    step = seconds(every)
    start = int(now if now is not None else time.time()) // step * step
    return datetime.fromtimestamp(start, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def trained_watermarks(store: str, accounts: list[str], options=None) -> dict[str, str | None]:
    """{account: data_watermark of its newest complete version, or None without one}. The newest,
    not the served one: an account rolled back to an older version is not retrained until its
    posts change again (a rollback is an operator's decision the schedule keeps)."""
    out = {}
    for a in accounts:
        try:
            out[a] = registry.versions(store, a, options)[-1].manifest.get("data_watermark") \
                if read_latest(join(store, a), options) else None
        except TkllmError:  # nothing complete under it: train it afresh
            out[a] = None
    return out


def run_retrain(cfg: RetrainConfig, progress: bool = True, now: float | None = None) -> dict:
    from tkllm_ray.data.ingest import account_watermarks, read_rows, run_ingest
    from tkllm_ray.train.packed_job import run_packed_finetune

    tick = cfg.tick or current_tick(cfg.every, now)
    report_uri = join(cfg.work, "reports", f"{tick}.json")
    if exists(report_uri, cfg.storage):
        report = json.loads(read_text(report_uri, cfg.storage))
        print(f"tick {tick}: done already ({len(report['retrained'])} accounts retrained); nothing to do")
        return {**report, "already_done": True}
    t0 = time.time()
    icfg = cfg.ingest_config(output=join(cfg.work, "datasets"), accounts=None)
    dataset, run_dir = join(cfg.work, "datasets"), join(cfg.work, "runs", tick)
    listing, marks_uri = join(run_dir, "accounts.txt"), join(run_dir, "watermarks.json")
    if exists(join(dataset, tick, "_COMPLETE"), cfg.storage) and exists(marks_uri, cfg.storage):
        # A rerun of a tick that crashed after its ingest: the same accounts and watermarks as its
        # dataset (posts that arrived since are the next tick's).
        plan = json.loads(read_text(marks_uri, cfg.storage))
        marks, enough, changed = plan["seen"], plan["enough"], plan["changed"]
    else:
        rows, _ = read_rows(icfg)
        marks = account_watermarks(rows)
        enough = sorted(a for a, m in marks.items() if int(m.rsplit("/", 1)[1]) >= icfg.min_posts)
        trained = trained_watermarks(cfg.deltas, enough, cfg.storage)
        changed = sorted(a for a in enough if trained[a] != marks[a])
    report = {"tick": tick, "accounts_seen": len(marks), "below_min_posts": sorted(set(marks) - set(enough)),
              "unchanged": sorted(set(enough) - set(changed)), "changed": changed, "retrained": [], "versions": {},
              "gc": {}}
    print(f"tick {tick}: {len(marks)} accounts, {len(changed)} changed, {len(report['unchanged'])} unchanged")
    if changed:
        if not exists(join(dataset, tick, "_COMPLETE"), cfg.storage):
            # The plan first: a crash after the ingest reruns with exactly these accounts and marks.
            write_text(marks_uri, json.dumps({"seen": marks, "enough": enough, "changed": changed}), cfg.storage)
            run_ingest(icfg.model_copy(update={"accounts": changed}), version=tick, progress=progress)
        write_text(listing, "\n".join(changed) + "\n", cfg.storage)
        accounts_marks = join(run_dir, "account-watermarks.json")
        write_text(accounts_marks, json.dumps({a: marks[a] for a in changed}), cfg.storage)
        fcfg = cfg.finetune_config(accounts=listing, data=join(dataset, tick), run_id=f"retrain-{tick}",
                                   run_dir=run_dir, watermarks=accounts_marks)
        result = run_packed_finetune(fcfg, progress=progress)
        report["retrained"] = [r["account"] for r in result["per_account"]]
        report["versions"] = {r["account"]: r.get("version") for r in result["per_account"]}
        report["finetune"] = {k: result[k] for k in ("run_id", "wall_s", "accounts_per_hour")}
        report["gc"] = registry.gc(cfg.deltas, cfg.keep_versions, report["retrained"], options=cfg.storage)
    report["wall_s"] = round(time.time() - t0, 2)
    write_text(report_uri, json.dumps(report, indent=2), cfg.storage)  # last: the tick is done
    print(f"tick {tick}: retrained {len(report['retrained'])}; report {report_uri}")
    return report


def run_every(cfg: RetrainConfig, progress: bool = True, max_ticks: int | None = None) -> None:
    """`tkllm retrain --every 1d` on a single machine: run the current tick, sleep until the next
    interval starts, repeat. A failed tick is retried after a back-off (it resumes while its
    interval lasts; after that the next tick retrains whatever is still changed)."""
    if cfg.tick is not None:
        raise TkllmError(f"a schedule runs the current tick each interval: drop tick ({cfg.tick}) to use --every")
    step, done = seconds(cfg.every), 0
    while max_ticks is None or done < max_ticks:
        try:
            run_retrain(cfg, progress)
            wait = step - time.time() % step + 1
        except Exception as e:  # keep the schedule alive
            print(f"retrain tick failed: {type(e).__name__}: {e}")
            wait = min(step / 4, 600)
        done += 1
        if max_ticks is None or done < max_ticks:
            time.sleep(wait)
