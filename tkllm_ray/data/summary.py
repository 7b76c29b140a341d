"""The ingest summary: what was read, kept, quarantined (by reason), deduplicated, tokenized
and rendered; saved as JSON and printed as a table."""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa

from tkllm_ray.data.schema import QUARANTINE_REASONS


def _partial_counts(batch: pa.Table, keys: list[str], total: str | None) -> pa.Table:
    aggs = [(total, "sum")] if total else [(keys[0], "count")]
    out = batch.select(keys + ([total] if total else [])).group_by(keys, use_threads=False).aggregate(aggs)
    return out.rename_columns(keys + ["n"])


def count_by(ds, keys: list[str], total: str | None = None) -> dict[tuple, int]:
    """Row counts (or sums of `total`) per key tuple: per-block partials, summed on the driver.
    No shuffle: a handful of keys per block is all that travels."""
    acc: dict[tuple, int] = defaultdict(int)
    partial = ds.map_batches(_partial_counts, batch_format="pyarrow", fn_kwargs={"keys": keys, "total": total})
    for rec in partial.take_all():
        acc[tuple(rec[k] for k in keys)] += int(rec["n"] or 0)
    return acc


def build_summary(cfg, rows, labelled, kept, images, skipped_files, vuri) -> dict:
    reasons = {r: 0 for r in QUARANTINE_REASONS}
    for (reason,), n in count_by(rows, ["quarantine_reason"]).items():
        if reason is not None:
            reasons[reason] = n
    per = defaultdict(lambda: defaultdict(int))
    for (acc, split), n in count_by(labelled, ["account_id", "split"]).items():
        per[acc][split] = n
    for (acc, split), n in count_by(kept, ["account_id", "split"], total="num_tokens").items():
        per[acc][f"{split}_tokens"] = n
    accounts = []
    for acc in sorted(per):
        c = per[acc]
        accounts.append({
            "account_id": acc, "train": c["train"], "eval": c["eval"],
            "duplicates": c["duplicate_exact"] + c["duplicate_normalized"],
            "skipped": c["account_below_min_posts"] > 0,
            "train_tokens": c["train_tokens"], "eval_tokens": c["eval_tokens"],
        })
    tot = lambda key: sum(per[a][key] for a in per)  # noqa: E731
    posts_read = rows.count()
    out = {
        "output": vuri,
        "inputs": [s.uri for s in cfg.inputs],
        "skipped_files": skipped_files,
        "posts_read": posts_read,
        "posts_kept": tot("train") + tot("eval"),
        "quarantined": reasons,
        "quarantined_total": sum(reasons.values()),
        "duplicates": {"exact": tot("duplicate_exact"), "normalized": tot("duplicate_normalized")},
        "accounts": {
            "seen": len(per),
            "kept": sum(1 for a in accounts if not a["skipped"]),
            "skipped_below_min_posts": sorted(a["account_id"] for a in accounts if a["skipped"]),
            "min_posts": cfg.min_posts,
        },
        "posts_in_skipped_accounts": tot("account_below_min_posts"),
        "train_posts": tot("train"),
        "eval_posts": tot("eval"),
        "tokens": {"train": tot("train_tokens"), "eval": tot("eval_tokens")},
        "per_account": [a for a in accounts if not a["skipped"]],
    }
    if images is not None:
        out["images"] = _image_summary(images.to_pandas())
    return out


def _image_summary(df) -> dict:
    by_mode = {}
    for mode, g in df.groupby("mode"):
        by_mode[mode] = {
            "images": int(len(g)),
            "text_tokens": int(g["text_tokens"].sum()),
            "visual_tokens": float(g["visual_tokens"].sum()),
            "compression_ratio": round(float(g["text_tokens"].sum() / g["visual_tokens"].sum()), 2),
            "chars_cut": int((g["chars_total"] - g["chars_rendered"]).sum()),
        }
    return {"count": int(len(df)), "render_s_total": round(float(df["render_s"].sum()), 2), "by_mode": by_mode}


def format_summary(s: dict) -> str:
    lines = [f"ingest summary  ->  {s.get('output', '')}", ""]
    rows = [
        ("posts read", s["posts_read"]), ("posts kept", s["posts_kept"]),
        ("  train / eval", f"{s['train_posts']} / {s['eval_posts']}"),
        ("quarantined", s["quarantined_total"]),
    ]
    rows += [(f"  {r}", n) for r, n in s["quarantined"].items() if n]
    rows += [
        ("duplicates exact / normalized", f"{s['duplicates']['exact']} / {s['duplicates']['normalized']}"),
        ("accounts seen / kept", f"{s['accounts']['seen']} / {s['accounts']['kept']}"),
        (f"accounts below {s['accounts']['min_posts']} posts", len(s["accounts"]["skipped_below_min_posts"])),
        ("tokens train / eval", f"{s['tokens']['train']} / {s['tokens']['eval']}"),
    ]
    if s.get("images"):
        rows.append(("context images", s["images"]["count"]))
        for mode, m in s["images"]["by_mode"].items():
            rows.append((f"  {mode}: text/visual tokens", f"{m['text_tokens']} / {m['visual_tokens']:.0f} = {m['compression_ratio']}x"))
    if s.get("skipped_files"):
        rows.append(("files skipped (unknown format)", len(s["skipped_files"])))
    w = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    lines += ["", f"  {'account':<28} {'train':>6} {'eval':>5} {'dups':>5} {'tokens':>8}"]
    for a in s["per_account"][:40]:
        lines.append(f"  {a['account_id'][:28]:<28} {a['train']:>6} {a['eval']:>5} {a['duplicates']:>5} {a['train_tokens']:>8}")
    if len(s["per_account"]) > 40:
        lines.append(f"  ... {len(s['per_account']) - 40} more accounts in summary.json")
    return "\n".join(lines)
