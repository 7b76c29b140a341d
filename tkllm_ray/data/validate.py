"""One raw record -> one row of ROW_SCHEMA: a clean post, or a quarantined record with its reason."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from tkllm_ray.data.fields import (
    BadValue,
    flatten,
    parse_count,
    parse_hashtags,
    parse_timestamp,
    pick_fields,
    to_jsonable,
)
from tkllm_ray.data.normalize import extract_hashtags, has_surrogates, merge_hashtags, normalize_text
from tkllm_ray.data.schema import ROW_SCHEMA, is_valid_account_id


@dataclass(frozen=True)
class RowRules:
    max_text_chars: int = 10_000
    min_created_at: datetime = datetime(2005, 1, 1, tzinfo=timezone.utc)
    max_future: timedelta = timedelta(days=1)
    timestamp_unit: str = "auto"
    field_map: tuple[tuple[str, str], ...] = ()


EMPTY_ROW = {f.name: None for f in ROW_SCHEMA}


def quarantined(source: str, row: int, reason: str, detail: str, raw: Any, account: Any = None) -> dict:
    out = dict(EMPTY_ROW)
    out.update(
        source=source,
        source_row=row,
        quarantine_reason=reason,
        quarantine_detail=detail[:500],
        raw=json.dumps(to_jsonable(raw), ensure_ascii=False, default=str)[:20_000],
        account_id=to_jsonable(account) if isinstance(account, str) else None,
    )
    return out


def record_to_row(record: Any, source: str, row: int, rules: RowRules) -> dict:
    if not isinstance(record, dict):
        return quarantined(source, row, "malformed_row", f"expected an object, got {type(record).__name__}", record)
    flat = flatten(record)
    fields, unknown = pick_fields(flat, dict(rules.field_map))

    account = fields.get("account_id")
    if isinstance(account, bytes):
        account = _decode(account)
    if account is None:
        return quarantined(source, row, "missing_account", "no account column had a value", record)
    if isinstance(account, (int, float)):
        account = str(int(account))
    account = str(account).strip().lstrip("@")
    if has_surrogates(account):
        return quarantined(source, row, "non_utf8", "account id is not valid UTF-8", record)
    if not is_valid_account_id(account):
        return quarantined(source, row, "invalid_account_id", f"{account!r} is not [A-Za-z0-9_.-]{{1,64}}", record, account)

    text = fields.get("text")
    if isinstance(text, bytes):
        text = _decode(text)
    if text is None:
        return quarantined(source, row, "missing_text", "no text column had a value", record, account)
    text = str(text)
    if has_surrogates(text):
        return quarantined(source, row, "non_utf8", "text is not valid UTF-8", record, account)
    text = normalize_text(text)
    if not text:
        return quarantined(source, row, "empty_after_normalization", "text is empty after clean-up", record, account)
    if len(text) > rules.max_text_chars:
        return quarantined(source, row, "too_long", f"{len(text)} chars > {rules.max_text_chars}", record, account)

    created_at = None
    if "created_at" in fields:
        try:
            created_at = parse_timestamp(fields["created_at"], rules.timestamp_unit)
        except BadValue as e:
            return quarantined(source, row, "bad_timestamp", str(e), record, account)
        now = datetime.now(timezone.utc)
        if not (rules.min_created_at <= created_at <= now + rules.max_future):
            return quarantined(
                source, row, "bad_timestamp", f"{created_at.isoformat()} is outside "
                f"[{rules.min_created_at.date()}, now]; is timestamp_unit right?", record, account
            )

    post_id = fields.get("post_id")
    post_id = str(int(post_id)) if isinstance(post_id, float) else (str(post_id) if post_id is not None else None)
    if not post_id:
        # Stable id for sources without one, so reruns name the same post the same way.
        basis = f"{account}\x00{created_at.isoformat() if created_at else ''}\x00{text}"
        post_id = "h" + hashlib.sha1(basis.encode()).hexdigest()[:16]

    out = dict(EMPTY_ROW)
    out.update(
        account_id=account,
        post_id=post_id,
        text=text,
        hashtags=merge_hashtags(parse_hashtags(fields.get("hashtags")), extract_hashtags(text)),
        created_at=created_at,
        position=_as_int(fields.get("position")),
        genre=str(fields["genre"]) if fields.get("genre") is not None else None,
        views=parse_count(fields.get("views")),
        likes=parse_count(fields.get("likes")),
        extra=json.dumps(to_jsonable(unknown), ensure_ascii=False, default=str) if unknown else None,
        source=source,
        source_row=row,
    )
    return out


def _decode(b: bytes) -> str:
    return b.decode("utf-8", errors="surrogateescape")


def _as_int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None
