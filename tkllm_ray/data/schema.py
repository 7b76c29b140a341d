"""The post row (DESIGN.md "Formats"), the quarantine reasons, and account-id validation."""

from __future__ import annotations

import re

import pyarrow as pa

from tkllm_ray.errors import TkllmError

ACCOUNT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Why a row was quarantined; each has a test.
QUARANTINE_REASONS = (
    "malformed_row",  # the record itself cannot be parsed (broken JSON line, ragged CSV row)
    "missing_account",
    "invalid_account_id",
    "missing_text",
    "non_utf8",
    "empty_after_normalization",
    "too_long",
    "bad_timestamp",
)

# What happened to a valid row in the per-account stage.
SPLITS = ("train", "eval")
DROPPED = ("duplicate_exact", "duplicate_normalized", "account_below_min_posts")

# One schema for every parsed row, good or quarantined, so blocks from any input format unify.
ROW_SCHEMA = pa.schema(
    [
        ("account_id", pa.string()),
        ("post_id", pa.string()),
        ("text", pa.string()),
        ("hashtags", pa.list_(pa.string())),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("position", pa.int64()),
        ("genre", pa.string()),
        ("views", pa.int64()),
        ("likes", pa.int64()),
        ("extra", pa.string()),  # unknown source columns, as a JSON object
        ("source", pa.string()),
        ("source_row", pa.int64()),
        ("quarantine_reason", pa.string()),
        ("quarantine_detail", pa.string()),
        ("raw", pa.string()),  # the source record (JSON) for quarantined rows only
    ]
)
POST_COLUMNS = [f.name for f in ROW_SCHEMA][:12]
QUARANTINE_COLUMNS = ["source", "source_row", "quarantine_reason", "quarantine_detail", "raw", "account_id"]


def is_valid_account_id(value: object) -> bool:
    # Leading dots are refused too: ".." or ".x" would escape or hide in a path.
    return isinstance(value, str) and bool(ACCOUNT_ID_RE.fullmatch(value)) and not value.startswith(".")


def validate_account_id(value: object) -> str:
    """Return `value` if it may name a path or key; otherwise one clear error."""
    if not is_valid_account_id(value):
        raise TkllmError(
            f"invalid account id {value!r}: use 1-64 characters from [A-Za-z0-9_.-], not starting with '.'"
        )
    return value  # type: ignore[return-value]
