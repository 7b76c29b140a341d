"""Read one account's tokenized posts from an ingested dataset and pack them into sequences."""

from __future__ import annotations

import pyarrow.dataset as pads
import torch

from tkllm_ray.data.accounts import order_key
from tkllm_ray.data.schema import validate_account_id
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import filesystem_for, join, list_dirs, resolve_latest


def account_posts(dataset: str, account_id: str, split: str, options=None) -> list[list[int]]:
    """Token ids of each post of `account_id` in `split` (train/eval), oldest first."""
    validate_account_id(account_id)
    root = resolve_latest(dataset, options)
    fs, path = filesystem_for(join(root, split, f"account_id={account_id}"), options)
    try:
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=["input_ids", "created_at", "position", "source", "source_row"])
    except (FileNotFoundError, OSError):
        raise TkllmError(f"account {account_id!r} has no {split} posts in {root} "
                         "(unknown account, or skipped below min_posts: see summary.json)") from None
    rows = sorted(table.to_pylist(), key=order_key)  # the order ingest split by
    return [r["input_ids"] for r in rows]


def genre_posts(dataset: str, split: str, options=None) -> dict[str, list[list[int]]]:
    """Token ids of every post in `split` that names a genre, grouped by genre (the style experts'
    training data)."""
    root = resolve_latest(dataset, options)
    fs, path = filesystem_for(join(root, split), options)
    try:
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["input_ids", "genre"])
    except (FileNotFoundError, OSError, KeyError, ValueError) as e:
        raise TkllmError(f"cannot read the {split} posts' genres in {root}: {e}") from None
    out: dict[str, list[list[int]]] = {}
    for ids, genre in zip(table.column("input_ids").to_pylist(), table.column("genre").to_pylist()):
        if genre:
            out.setdefault(genre, []).append(ids)
    return out


def list_accounts(dataset: str, options=None) -> list[str]:
    """Every account with train posts in an ingested dataset (its train/account_id=... partitions)."""
    partitions = list_dirs(join(resolve_latest(dataset, options), "train"), options)
    return sorted(n.split("=", 1)[1] for n in partitions if n.startswith("account_id="))


def pack(posts: list[list[int]], eos_id: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate posts, each closed by EOS, and cut into rows of `seq_len`. Returns
    (input_ids, labels); the padding after the last post is labelled -100 (not predicted)."""
    stream = [t for p in posts for t in (*p, eos_id)]
    if not stream:
        raise TkllmError("no tokens to train on")
    n = -(-len(stream) // seq_len)
    out = torch.full((n, seq_len), eos_id, dtype=torch.long)
    flat = torch.tensor(stream, dtype=torch.long)
    out.view(-1)[: flat.numel()] = flat
    labels = out.clone()
    labels.view(-1)[flat.numel():] = -100
    return out, labels
