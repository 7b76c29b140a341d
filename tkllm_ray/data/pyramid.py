"""Optical forgetting: which posts go into which image, at what visual-token budget.

History is cut into temporal buckets, newest first. Bucket k holds `first_bucket_posts * 2^k`
posts and gets a budget of N_k = N_0 / 2^k visual tokens (N_0 = the mode's budget), so older
posts are squeezed into ever fewer tokens. Posts older than the last bucket collapse into one
"style summary" image (top hashtags, emoji, length, catch-phrases, cadence) at N_0 / 2^K.

Visual tokens follow DeepSeek-OCR's DeepEncoder: 16x16 patches, then 16x token compression,
so a side of R pixels gives (R/16)^2 / 16 tokens, and a budget N needs R = 64 * sqrt(N).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

MODES = {"tiny": 512, "base": 1024, "hifi": 1280}
SUMMARY_BUCKET = -1


def visual_tokens(side_px: int) -> int:
    return (side_px // 16) ** 2 // 16


def side_for_budget(tokens: float) -> int:
    """Image side (multiple of 16 px) whose visual-token count is closest to `tokens`."""
    return max(64, int(round(64 * math.sqrt(tokens) / 16)) * 16)


@dataclass(frozen=True)
class ImagePlan:
    account_id: str
    mode: str
    bucket: int  # 0 = newest; SUMMARY_BUCKET for the style summary
    canvas_px: int  # text is laid out at the mode's full size...
    side_px: int  # ...then downsampled to this (the forgetting)
    visual_tokens: float  # N_0 / 2^k, the budget
    text: str
    posts: int
    oldest: str | None
    newest: str | None


def bucket_sizes(n_posts: int, first_bucket_posts: int, num_buckets: int) -> list[int]:
    sizes, left = [], n_posts
    for k in range(num_buckets):
        if left <= 0:
            break
        take = min(left, first_bucket_posts * 2**k)
        sizes.append(take)
        left -= take
    return sizes


def plan_account(account_id: str, posts: list[dict], modes: list[str], first_bucket_posts: int,
                 num_buckets: int, summary: bool) -> list[ImagePlan]:
    """`posts`: dicts with text, created_at (datetime or None), hashtags; newest first."""
    sizes = bucket_sizes(len(posts), first_bucket_posts, num_buckets)
    chunks, start = [], 0
    for n in sizes:
        chunks.append(posts[start : start + n])
        start += n
    rest = posts[start:]
    plans = []
    for mode in modes:
        n0 = visual_tokens(MODES[mode])
        for k, chunk in enumerate(chunks):
            budget = n0 / 2**k
            plans.append(_plan(account_id, mode, k, MODES[mode], budget, _context_text(chunk), chunk))
        if summary and rest:
            budget = n0 / 2 ** len(chunks)
            plans.append(_plan(account_id, mode, SUMMARY_BUCKET, MODES[mode], budget,
                               style_summary(account_id, rest), rest))
    return plans


def _plan(account_id, mode, bucket, canvas, budget, text, chunk) -> ImagePlan:
    side = min(canvas, side_for_budget(budget))
    times = [p["created_at"] for p in chunk if p.get("created_at") is not None]
    return ImagePlan(account_id, mode, bucket, canvas, side, budget, text, len(chunk),
                     _iso(min(times)) if times else None, _iso(max(times)) if times else None)


def _iso(t: datetime) -> str:
    return t.date().isoformat()


def _context_text(posts: list[dict]) -> str:
    lines = []
    for p in posts:
        date = f"[{p['created_at'].date().isoformat()}] " if p.get("created_at") is not None else ""
        lines.append(date + p["text"])
    return "\n\n".join(lines)


_EMOJI_RE = re.compile("[\U0001F300-\U0001FAFF\u2600-\u27BF\u2B50\u2764]")
_WORD_RE = re.compile(r"[^\W\d_][\w']*", re.UNICODE)


def style_summary(account_id: str, posts: list[dict]) -> str:
    """A compact description of a stretch of history: what survives optical forgetting."""
    tags = Counter(t.lower() for p in posts for t in (p.get("hashtags") or []))
    emoji = Counter(ch for p in posts for ch in _EMOJI_RE.findall(p["text"]))
    words = [len(_WORD_RE.findall(p["text"])) for p in posts]
    grams: Counter = Counter()
    for p in posts:
        w = [x.lower() for x in _WORD_RE.findall(p["text"])]
        grams.update(" ".join(w[i : i + 3]) for i in range(len(w) - 2))
    times = sorted(p["created_at"] for p in posts if p.get("created_at") is not None)
    lines = [f"@{account_id} · style summary · {len(posts)} older posts"]
    if times:
        days = max((times[-1] - times[0]).total_seconds() / 86400, 1.0)
        lines.append(f"{times[0].date()} → {times[-1].date()} · {len(posts) / days:.2f} posts/day")
    lines.append(f"avg {sum(words) / max(len(words), 1):.1f} words/post")
    if tags:
        lines.append("tags: " + " ".join(f"#{t}" for t, _ in tags.most_common(8)))
    if emoji:
        lines.append("emoji: " + " ".join(e for e, _ in emoji.most_common(8)))
    phrases = [g for g, c in grams.most_common(5) if c > 1]
    if phrases:
        lines.append("phrases: " + " | ".join(f"“{g}”" for g in phrases))
    return "\n".join(lines)
