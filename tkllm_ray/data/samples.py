"""The real sample data under ../shared/data (not in the repo: see its README) and how to read it."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """TKLLM_SHARED_DATA, else ../shared/data beside the repository; None if absent."""
    env = os.environ.get("TKLLM_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def sample_inputs() -> list[dict]:
    """Input specs for the real samples that are present, with the options each file needs."""
    root = shared_data_dir()
    if root is None:
        return []
    specs = [
        # creation_time in this scraper export counts thousands of seconds (1476391 = Oct 2016).
        ("tiktok-accounts-dev.csv", {"timestamp_unit": "ks"}),
        # No timestamps: `position` gives the order.
        ("accounts-dev.jsonl", {}),
        # Vietnamese captions, counts like 304.9K; few posts per account (most fall below min_posts).
        ("tiktok-captions-vi.csv", {}),
    ]
    return [{"uri": str(root / name), **opts} for name, opts in specs if (root / name).is_file()]


def corpus_path() -> Path | None:
    root = shared_data_dir()
    p = root / "tweets-corpus.txt" if root else None
    return p if p and p.is_file() else None
