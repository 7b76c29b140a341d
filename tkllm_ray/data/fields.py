"""Map a raw record (any export's column names) onto the post row's fields, and parse values
that scrapers write in many shapes: timestamps, counts like '304.9K', hashtag lists."""

from __future__ import annotations

import ast
import json
import math
import re
from datetime import datetime, timezone
from typing import Any

# Canonical field -> source names tried in order (compared case-insensitively, dotted = nested).
ALIASES: dict[str, tuple[str, ...]] = {
    "account_id": ("account_id", "authorMeta.name", "author.uniqueId", "author.unique_id",
                   "author_unique_id", "uniqueId", "unique_id", "username", "user_name",
                   "author_name", "author", "account", "handle", "user"),
    "post_id": ("post_id", "id", "video_id", "vid_id", "aweme_id", "item_id"),
    "text": ("text", "desc", "description", "caption", "vid_caption", "title", "content", "body"),
    "hashtags": ("hashtags", "challenges", "vid_hashtags", "tags", "hashtag_names"),
    "created_at": ("created_at", "createTimeISO", "createTime", "create_time", "creation_time",
                   "vid_postTime", "posted_at", "timestamp", "date", "time"),
    "position": ("position",),
    "genre": ("genre", "category"),
    "views": ("views", "playCount", "play_count", "plays", "vid_nview", "view_count", "stats.playCount"),
    "likes": ("likes", "diggCount", "digg_count", "diggs", "vid_nlike", "like_count", "stats.diggCount"),
}

TIMESTAMP_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "ks": 1e3}
_COUNT_RE = re.compile(r"^\s*([0-9][0-9,]*(?:\.[0-9]+)?)\s*([kKmMbB]?)\s*$")
_MULT = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}


class BadValue(ValueError):
    """A field value that cannot be parsed; the message goes to the quarantine record."""


def flatten(record: dict, prefix: str = "") -> dict:
    """{'authorMeta': {'name': 'x'}} -> {'authorMeta.name': 'x'}; lists stay values."""
    out: dict = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def pick_fields(record: dict, field_map: dict[str, str] | None = None) -> tuple[dict, dict]:
    """Split a flattened record into (canonical field -> raw value, unknown columns)."""
    lower = {k.lower(): k for k in record}
    used: set[str] = set()
    found: dict[str, Any] = {}
    for field, aliases in ALIASES.items():
        names = (field_map[field],) if field_map and field in field_map else aliases
        for name in names:
            key = lower.get(name.lower())
            if key is not None and key not in used and not _is_blank(record[key]):
                found[field] = record[key]
                used.add(key)
                break
            if key is not None:
                used.add(key)  # present but blank: still a known column, not an "unknown" one
    unknown = {k: v for k, v in record.items() if k not in used}
    return found, unknown


def _is_blank(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def parse_timestamp(value: Any, unit: str = "auto") -> datetime:
    """UTC datetime from epoch numbers (unit s/ms/us/ns/ks, or inferred by magnitude), ISO or
    'YYYY-MM-DD HH:MM:SS' strings (naive = UTC), or datetime objects."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, bool):
        raise BadValue(f"not a timestamp: {value!r}")
    number = _as_number(value)
    if number is not None:
        scale = TIMESTAMP_UNITS[unit] if unit != "auto" else _infer_scale(number)
        try:
            return datetime.fromtimestamp(number * scale, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise BadValue(f"timestamp out of range: {value!r}") from None
    if isinstance(value, str):
        s = value.strip().replace("Z", "+00:00")
        try:
            dt = datetime.fromisoformat(s)
        except ValueError:
            raise BadValue(f"unparseable timestamp: {value!r}") from None
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    raise BadValue(f"not a timestamp: {value!r}")


def _infer_scale(x: float) -> float:
    ax = abs(x)
    if ax >= 1e17:
        return 1e-9
    if ax >= 1e14:
        return 1e-6
    if ax >= 1e11:
        return 1e-3
    return 1.0


def _as_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value):
        return float(value)
    return None


def parse_count(value: Any) -> int | None:
    """Engagement counts: 1234, '1,234', '304.9K', '1.4M'. Unparseable -> None (not fatal)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else int(value)
    m = _COUNT_RE.match(str(value))
    if not m:
        return None
    return int(round(float(m.group(1).replace(",", "")) * _MULT[m.group(2).lower()]))


def parse_hashtags(value: Any) -> list[str]:
    """Lists of strings or of {'title'|'name': ...} dicts, JSON/Python list literals,
    or separated strings ('a, b', '#a #b')."""
    if value is None:
        return []
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            for loader in (json.loads, ast.literal_eval):
                try:
                    return parse_hashtags(loader(s))
                except (ValueError, SyntaxError):
                    continue
        return [t for t in re.split(r"[\s,;]+", s.replace("#", " ")) if t]
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            if isinstance(item, dict):
                item = item.get("title") or item.get("name") or item.get("hashtagName")
            if isinstance(item, str) and item.strip():
                out.append(item.strip().lstrip("#"))
        return out
    return []


def to_jsonable(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="backslashreplace")
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, str):
        return v.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return v
