"""Dedupe and the per-account time split."""

from datetime import datetime, timedelta, timezone

import pyarrow as pa

from tkllm_ray.data.accounts import SplitRules, split_account
from tkllm_ray.data.schema import POST_COLUMNS, ROW_SCHEMA

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def table(posts):
    rows = []
    for i, (text, hours) in enumerate(posts):
        rows.append({"account_id": "ana", "post_id": f"p{i}", "text": text, "hashtags": [],
                     "created_at": T0 + timedelta(hours=hours) if hours is not None else None,
                     "position": i, "source": "s", "source_row": i})
    schema = pa.schema([ROW_SCHEMA.field(c) for c in POST_COLUMNS])
    return pa.Table.from_pylist(rows, schema=schema)


def test_newest_posts_go_to_eval_regardless_of_input_order():
    posts = [(f"post number {i}", h) for i, h in enumerate([5, 1, 9, 3, 7, 0, 8, 2, 6, 4])]
    out = split_account(table(posts), SplitRules(eval_fraction=0.2, min_posts=3)).to_pylist()
    evals = sorted(r["created_at"] for r in out if r["split"] == "eval")
    trains = [r["created_at"] for r in out if r["split"] == "train"]
    assert len(evals) == 2 and len(trains) == 8
    assert min(evals) > max(trains)
    assert evals == [T0 + timedelta(hours=8), T0 + timedelta(hours=9)]


def test_split_does_not_depend_on_the_order_rows_arrive_in():
    # A shuffle delivers an account's rows in any order; ties in time break on source position.
    t = table([(f"p {i}", i % 4) for i in range(30)])
    a = split_account(t, SplitRules()).to_pylist()
    b = split_account(t.take(list(reversed(range(30)))), SplitRules()).to_pylist()
    key = lambda rows: sorted((r["text"], r["split"]) for r in rows)  # noqa: E731
    assert key(a) == key(b)


def test_exact_and_normalised_duplicates_keep_the_oldest():
    posts = [("Hello world!", 0), ("Hello world!", 5), ("  HELLO   world ", 6), ("other", 1)] + \
            [(f"filler {i}", 10 + i) for i in range(3)]
    out = split_account(table(posts), SplitRules(min_posts=2)).to_pylist()
    by_split = {}
    for r in out:
        by_split.setdefault(r["split"], []).append(r["post_id"])
    assert by_split["duplicate_exact"] == ["p1"]
    assert by_split["duplicate_normalized"] == ["p2"]
    assert "p0" in by_split["train"]


def test_account_below_min_posts_is_skipped():
    out = split_account(table([(f"p{i}", i) for i in range(5)]), SplitRules(min_posts=6)).to_pylist()
    assert {r["split"] for r in out} == {"account_below_min_posts"}


def test_posts_without_timestamps_follow_source_position():
    out = split_account(table([(f"p{i}", None) for i in range(10)]), SplitRules(min_posts=2)).to_pylist()
    assert [r["post_id"] for r in out if r["split"] == "eval"] == ["p8", "p9"]
