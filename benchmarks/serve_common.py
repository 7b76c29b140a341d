"""What the serving benchmarks share (serve_bench.py, serve_latency.py, store_reads.py): the
device, random deltas published to a local store, requests, percentiles, a dropped page cache."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from tkllm_ray.serve.engine import GenRequest
from tkllm_ray.sparse.delta_store import FORMAT_VERSION, save_delta

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # of the served weights and deltas


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def random_delta(shapes: dict, density: float, seed: int) -> dict:
    """Sorted unique random entries per module (a few duplicates drawn are dropped)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, numel in shapes.items():
        idx = torch.unique(torch.randint(0, numel, (max(1, round(density * numel)),), generator=g))
        out[name] = (idx, (torch.randn(idx.numel(), generator=g) * 1e-2).to(torch.bfloat16))
    return out


def requests(args, deltas: list, seed: int = 0) -> list[GenRequest]:
    g = torch.Generator().manual_seed(seed)
    return [GenRequest(torch.randint(3, args.vocab, (args.prompt,), generator=g).tolist(), d, args.new_tokens)
            for d in deltas]


def publish_random(store: str, accounts: list[str], shapes: dict, density: float, model: str, fp: str,
                   format_version: int = FORMAT_VERSION) -> None:
    """A random delta per account (seeded by its position) published to `store`, on threads (torch
    and file writes release the GIL)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda a: save_delta(store, accounts[a], random_delta(shapes, density, a), model, fp, "gspf",
                                           density, format_version=format_version), range(len(accounts))))


def drop_page_cache() -> bool:
    """Flush the store's fresh writes (else the cold loads below read beside their writeback), then
    drop the page cache where this process may (root on Linux), so a cold load reads the disk.
    Returns whether the cache was dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False
