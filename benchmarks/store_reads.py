"""How long the store's part of a cold delta load takes on this machine's disk: LATEST, the
manifest and the delta file read with its hash (what `DeltaCache` does before any device work),
for files never read since they were written and then for the same files read again, the page
cache dropped before each pass. No GPU needed; the tail is the disk's.

    python benchmarks/store_reads.py --files 400 --direct [--settle 90] [--model tkllm-s]
    python benchmarks/store_reads.py --files 200 --prefetch-threads 1 4 8   # also a replica's prefetch

Writes store-reads-<device>.json: p50/p90/p99/max per pass and the reads over 100 ms (with when
they started after the drop); with --prefetch-threads, the time a serving cache's `prefetch`
takes per account (read, indices expanded and checked on the CPU, pinned where there is a GPU)
at each thread count, the counts taking turns, the page cache dropped before each.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import tempfile
import time

import torch
from results_io import write_result  # sibling modules: this script's folder is on sys.path
from serve_common import CUDA, DEV, DTYPE, drop_page_cache, pct, publish_random
from transformers import LlamaForCausalLM

from tkllm_ray.models.presets import preset_config
from tkllm_ray.serve.delta_cache import DeltaCache
from tkllm_ray.sparse.delta_store import read_version
from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.storage import join, read_hashed


def shapes_of(model: str, vocab: int) -> dict[str, int]:
    """Target linears' weight sizes, from the config alone (a meta-device model: no weights made)."""
    cfg = preset_config(model)
    cfg.vocab_size = vocab
    with torch.device("meta"):
        return {n: m.weight.numel() for n, m in target_linears(LlamaForCausalLM(cfg)).items()}


def read_direct(path: str) -> int:
    """The file's bytes with O_DIRECT (past the page cache) into a page-aligned buffer; no hash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.fstat(fd).st_size
        buf = mmap.mmap(-1, max(4096, -(-size // 4096) * 4096))  # anonymous maps are page-aligned
        got = 0
        while got < size and (n := os.preadv(fd, [memoryview(buf)[got:]], got)):
            got += n
        return got
    finally:
        os.close(fd)


def read_pass(store: str, accounts: list[str], direct: bool = False) -> dict:
    """One pass over the accounts after the page cache is dropped; the slow reads with when they
    started (s after the drop). `direct`: the files read with O_DIRECT instead of `read_hashed`."""
    drop_page_cache()
    t0, times, slow = time.perf_counter(), [], []
    for i, a in enumerate(accounts):
        t = time.perf_counter()
        version, _ = read_version(store, a)
        path = join(store, a, version, "delta.safetensors")
        read_direct(path) if direct else read_hashed(path)
        times.append((time.perf_counter() - t) * 1e3)
        if times[-1] > 100:
            slow.append({"read": i, "ms": round(times[-1], 1), "started_s": round(t - t0, 2)})
    return {"p50_ms": pct(times, 0.5), "p90_ms": pct(times, 0.9), "p99_ms": pct(times, 0.99), "max_ms": max(times),
            "over_100ms": slow}


def prefetch_passes(store: str, accounts: list[str], shapes: dict, fp: str, threads: list[int], reps: int) -> dict:
    """ms per account of `DeltaCache.prefetch` over all the accounts, per thread count (the counts
    taking turns, `reps` times, the page cache dropped before each)."""
    got: dict[str, list[float]] = {str(k): [] for k in threads}
    for _ in range(reps):
        for k in threads:
            drop_page_cache()
            cache = DeltaCache(store, DEV, host_budget=1 << 40, base_fingerprint=fp, dtype=DTYPE, shapes=shapes,
                               prefetch_threads=k)
            t = time.perf_counter()
            n = len(cache.prefetch(accounts).result())
            got[str(k)].append((time.perf_counter() - t) * 1e3 / n)
            cache.close()
    return {"ms_per_account": got, "pinned": CUDA}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tkllm-s")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--settle", type=float, default=0.0, help="seconds to wait after the writes are flushed")
    ap.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    ap.add_argument("--direct", action="store_true", help="a third pass reading with O_DIRECT (past the page cache)")
    ap.add_argument("--prefetch-threads", type=int, nargs="*", default=[], help="also time a serving cache's "
                    "prefetch of every account at these thread counts")
    ap.add_argument("--prefetch-reps", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    shapes = shapes_of(args.model, args.vocab)
    accounts = [f"acct{a:05d}" for a in range(args.files)]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = os.path.join(tmp, "deltas")
        fp = "sha256:" + "0" * 64
        publish_random(store, accounts, shapes, args.density, args.model, fp)
        os.sync()
        time.sleep(args.settle)
        size = os.path.getsize(join(store, accounts[0], read_version(store, accounts[0])[0], "delta.safetensors"))
        res = {"host": platform.node(), "config": vars(args), "file_mb": size / 2**20,
               "first_reads": read_pass(store, accounts), "second_reads": read_pass(store, accounts)}
        if args.direct:
            res["direct_reads"] = read_pass(store, accounts, direct=True)
        if args.prefetch_threads:
            res["prefetch"] = prefetch_passes(store, accounts, shapes, fp, args.prefetch_threads, args.prefetch_reps)
    print(res, flush=True)
    write_result(args.out, "store-reads", torch.cuda.get_device_name(0) if CUDA else "cpu-" + platform.machine(), res)
    return res


if __name__ == "__main__":
    main()
