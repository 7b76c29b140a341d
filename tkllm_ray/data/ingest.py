"""The ingest pipeline on Ray Data: read -> validate/quarantine -> per-account dedupe and
time split -> tokenize -> render context images -> publish a new dataset version.

Layout of a published version under `output`:
  {version}/train/account_id=X/*.parquet   {version}/eval/account_id=X/*.parquet
  {version}/quarantine/*.parquet           {version}/images/X/{mode}-b{k}.png, images/manifest/*.parquet
  {version}/summary.json                   LATEST  (written last: the version is visible only then)
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

import ray
from ray.data import ActorPoolStrategy, DataContext

from tkllm_ray.config.ingest import IngestConfig
from tkllm_ray.data import stages
from tkllm_ray.data.accounts import SplitRules, split_account
from tkllm_ray.data.readers import resolve_input_files
from tkllm_ray.data.summary import build_summary
from tkllm_ray.data.validate import RowRules
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import filesystem_for, join, publish, write_text


def ensure_ray(address: str | None = None) -> None:
    # Ray Data logs every execution plan at INFO; the summary table is what a user reads.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ray.is_initialized():
        # A local cluster runs without the dashboard, so Ray Train's placement-group cleaner warns
        # every second that the state API is unreachable: library logs in workers at ERROR.
        quiet = ray.LoggingConfig(log_level="ERROR") if address is None else None
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 logging_config=quiet, ignore_reinit_error=True)


def read_rows(cfg: IngestConfig):
    """Every input file read and parsed on Ray Data (ROW_SCHEMA rows, quarantined ones marked),
    narrowed to `cfg.accounts` when given; also the files skipped as unreadable formats."""
    sources: dict[str, tuple[str, str]] = {}
    rules: dict[str, RowRules] = {}
    skipped_files: list[str] = []
    groups: dict[str, tuple[object, list[str]]] = {}  # one read per filesystem kind
    for spec in cfg.inputs:  # list and check every input on the driver: errors come before any work
        files, skipped = resolve_input_files(spec.uri, spec.format, cfg.storage)
        skipped_files += skipped
        for uri, fmt in files:
            fs, path = filesystem_for(uri, cfg.storage)
            sources[path] = (uri, fmt)
            rules[uri] = RowRules(
                max_text_chars=cfg.max_text_chars,
                min_created_at=datetime(cfg.min_year, 1, 1, tzinfo=timezone.utc),
                timestamp_unit=spec.timestamp_unit,
                field_map=tuple(sorted(spec.field_map.items())),
            )
            groups.setdefault(type(fs).__name__, (fs, []))[1].append(path)

    ensure_ray(cfg.ray_address)
    reads = [ray.data.read_binary_files(paths, filesystem=fs, include_paths=True) for fs, paths in groups.values()]
    raw = reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]
    rows = raw.map_batches(stages.parse_files, batch_size=1, batch_format="pyarrow",
                           fn_kwargs={"sources": sources, "rules": rules})
    if cfg.accounts is not None:
        rows = rows.map_batches(stages.only_accounts, batch_format="pyarrow", fn_kwargs={"accounts": cfg.accounts})
    return rows.materialize(), skipped_files


def account_watermarks(rows) -> dict[str, str]:
    """{account: "<newest valid post's time>/<valid posts>"}: what a delta was trained on, recorded
    in its manifest; a new, edited-in or deleted post changes it (retraining compares the two)."""
    out: dict[str, str] = {}
    clean = rows.map_batches(stages.only_clean, batch_format="pyarrow")
    for batch in clean.groupby("account_id").map_groups(stages.newest_and_count, batch_format="pyarrow") \
            .iter_batches(batch_format="pyarrow"):
        for acc, newest, n in zip(*(batch.column(c).to_pylist() for c in ("account_id", "newest", "posts"))):
            out[acc] = f"{newest.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}/{n}"
    return out


def run_ingest(cfg: IngestConfig, version: str | None = None, progress: bool | None = None) -> dict:
    t0 = time.time()
    ctx = DataContext.get_current()
    if progress is not None:
        ctx.enable_progress_bars = progress
    rows, skipped_files = read_rows(cfg)

    labelled = (
        rows.map_batches(stages.only_clean, batch_format="pyarrow")
        .groupby("account_id", num_partitions=cfg.shuffle_partitions)
        .map_groups(split_account, batch_format="pyarrow",
                    fn_kwargs={"rules": SplitRules(cfg.eval_fraction, cfg.min_posts)})
        .materialize()
    )
    kept = (
        labelled.map_batches(stages.only_split, batch_format="pyarrow", fn_kwargs={"splits": ("train", "eval")})
        .map_batches(stages.Tokenize, batch_format="pyarrow", batch_size=256,
                     compute=ActorPoolStrategy(size=cfg.tokenize_actors), fn_constructor_kwargs={"spec": cfg.tokenizer})
        .materialize()
    )
    if kept.count() == 0:
        raise TkllmError(
            f"no account has {cfg.min_posts}+ valid posts in {[s.uri for s in cfg.inputs]}: "
            "nothing to write (lower min_posts or check the quarantine reasons)"
        )

    summary_box: dict = {}

    def write_version(vuri: str) -> None:
        fs, _ = filesystem_for(vuri, cfg.storage)
        for split in ("train", "eval"):
            _, path = filesystem_for(join(vuri, split), cfg.storage)
            kept.map_batches(stages.only_split, batch_format="pyarrow",
                             fn_kwargs={"splits": (split,), "drop_split": True}) \
                .write_parquet(path, filesystem=fs, partition_cols=["account_id"])
        quarantine = rows.map_batches(stages.only_quarantined, batch_format="pyarrow").materialize()
        if quarantine.count():
            quarantine.write_parquet(filesystem_for(join(vuri, "quarantine"), cfg.storage)[1], filesystem=fs)
        images = _render(cfg, kept, vuri) if cfg.render.enabled else None
        summary_box.update(build_summary(cfg, rows, labelled, kept, images, skipped_files, vuri))
        summary_box["elapsed_s"] = round(time.time() - t0, 2)
        write_text(join(vuri, "summary.json"), json.dumps(summary_box, indent=2, ensure_ascii=False), cfg.storage)

    v = publish(cfg.output, write_version, version=version, options=cfg.storage)
    summary_box["version"] = v
    return summary_box


def _render(cfg: IngestConfig, kept, vuri: str):
    r = cfg.render
    train = kept.map_batches(stages.only_split, batch_format="pyarrow", fn_kwargs={"splits": ("train",)})
    plans = train.groupby("account_id", num_partitions=cfg.shuffle_partitions).map_groups(
        stages.plan_group, batch_format="pyarrow",
        fn_kwargs={"modes": list(r.modes), "first_bucket_posts": r.first_bucket_posts,
                   "num_buckets": r.num_buckets, "summary": r.summary},
    ).materialize()  # finish the shuffle before the actor pool takes the CPUs
    actors = max(1, min(r.actors, int(ray.available_resources().get("CPU", 1))))
    images = plans.map_batches(
        stages.RenderImages, batch_size=2, batch_format="pyarrow", compute=ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"images_uri": join(vuri, "images"), "tokenizer": cfg.tokenizer,
                               "fonts": r.fonts, "storage": cfg.storage.model_dump()},
    ).materialize()
    fs, path = filesystem_for(join(vuri, "images", "manifest"), cfg.storage)
    images.write_parquet(path, filesystem=fs)
    return images
