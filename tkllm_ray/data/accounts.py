"""Per-account stage: order an account's posts in time, drop duplicates, split train/eval.

Runs once per account (Ray Data `groupby(account_id).map_groups`) on clean rows, and labels
every row with `split`: train, eval, or why it was dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from tkllm_ray.data.normalize import dedupe_key


@dataclass(frozen=True)
class SplitRules:
    eval_fraction: float = 0.2
    min_posts: int = 20
    min_eval_posts: int = 1


def order_key(row: dict) -> tuple:
    """Time order; posts with no timestamp fall back to the source's position, then file order."""
    ts = row["created_at"]
    return (
        ts.timestamp() if ts is not None else float("-inf"),
        row["position"] if row["position"] is not None else -1,
        row["source"] or "",
        row["source_row"] if row["source_row"] is not None else -1,
    )


def split_account(table: pa.Table, rules: SplitRules) -> pa.Table:
    rows = sorted(table.to_pylist(), key=order_key)
    seen_exact: set = set()
    seen_norm: set = set()
    kept: list[dict] = []
    for row in rows:  # oldest first: the original survives, later reposts are the duplicates
        exact = (row["text"],)
        if exact in seen_exact or ("id", row["post_id"]) in seen_exact:
            row["split"] = "duplicate_exact"
            continue
        seen_exact.update([exact, ("id", row["post_id"])])
        norm = dedupe_key(row["text"])
        if norm in seen_norm:
            row["split"] = "duplicate_normalized"
            continue
        seen_norm.add(norm)
        kept.append(row)
    if len(kept) < rules.min_posts:
        for row in kept:
            row["split"] = "account_below_min_posts"
    else:
        n_eval = max(rules.min_eval_posts, math.ceil(len(kept) * rules.eval_fraction))
        n_eval = min(n_eval, len(kept) - 1)
        for i, row in enumerate(kept):
            row["split"] = "eval" if i >= len(kept) - n_eval else "train"
    schema = table.schema.append(pa.field("split", pa.string()))
    return pa.Table.from_pylist(rows, schema=schema)
