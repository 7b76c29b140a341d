"""The latency section of serve_bench.py (issue 5): cold delta loads (store -> device) from the
disk, where a cold load's time goes, the same deltas in delta formats 2 and 3, and time to first
token when the working set fits the device cache vs one 4x larger: with the host tier prefetched
(as a replica runs by default: `host_prefetch`) and with no host tier (every device miss a store
read)."""

from __future__ import annotations

import gc
import os
import time
from contextlib import contextmanager

import torch
from results_io import sync  # sibling modules: this script's folder is on sys.path
from serve_common import DEV, DTYPE, drop_page_cache, pct, publish_random, requests

from tkllm_ray.serve.delta_cache import DeltaCache, _Encoded
from tkllm_ray.serve.engine import DeltaBatchEngine
from tkllm_ray.sparse.delta_store import decode, read_version
from tkllm_ray.storage import join, read_hashed, read_latest


@contextmanager
def gc_pauses(out: dict, key: str):
    """Record the garbage collections run inside the block (a full one pauses every request):
    out[key] = {generation: {count, max_ms, total_ms}}."""
    started, pauses = {}, {}

    def note(phase, info):
        if phase == "start":
            started[info["generation"]] = time.perf_counter()
        elif info["generation"] in started:
            pauses.setdefault(str(info["generation"]), []).append(
                (time.perf_counter() - started.pop(info["generation"])) * 1e3)

    gc.callbacks.append(note)
    try:
        yield
    finally:
        gc.callbacks.remove(note)
        out[key] = {g: {"count": len(ms), "max_ms": max(ms), "total_ms": sum(ms)} for g, ms in pauses.items()}


def cold_phases(store: str, fp: str, accounts: list[str]) -> dict:
    """Diagnostics: where a cold load's time goes, phase by phase (device-synced), over accounts
    whose files the cache has not read: manifest (LATEST and manifest.json), the file read with
    its hash, decoding the views, the copy to the device, the entries check there."""
    probe = DeltaCache(store, DEV, device_budget=1 << 40, host_budget=1, base_fingerprint=fp, dtype=DTYPE)
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        phases.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
        return out

    for a in accounts:
        version, manifest = timed("manifest", lambda: read_version(store, a))
        blob, _ = timed("read_and_hash", lambda: read_hashed(join(store, a, version, "delta.safetensors")))
        enc = timed("decode", lambda: decode(blob, None, expand=False))
        # format 3: copied as stored and expanded there (int64 until checked), as the cache does
        hot = timed("to_device_and_expand", lambda: _Encoded(a, version, manifest, enc).expand(DEV, DTYPE))
        timed("check", lambda: probe._check_entries(hot))
    probe.close()
    return {k: pct(v, 0.5) for k, v in phases.items()}


def by_format(args, shapes: dict, fp: str, root: str) -> dict:
    """Cold loads of the same deltas stored in format 2 (int32 indices) and format 3 (16-bit gaps),
    from the disk, the two taking turns account by account, each through its own cache."""
    accounts = [f"fmt{a:04d}" for a in range(args.format_accounts)]
    stores = {v: os.path.join(root, f"format{v}") for v in (2, 3)}
    for v, st in stores.items():  # the same deltas (seeded by position) in each format
        publish_random(st, accounts, shapes, args.density, args.model, fp, format_version=v)
    out = {"page_cache_dropped": drop_page_cache()}
    caches = {v: DeltaCache(st, DEV, device_budget=1 << 40, host_budget=1, base_fingerprint=fp, dtype=DTYPE)
              for v, st in stores.items()}
    loads: dict[int, list[float]] = {v: [] for v in stores}
    for a in accounts:
        for v, cache in caches.items():
            t = time.perf_counter()
            cache.get(a)
            loads[v].append((time.perf_counter() - t) * 1e3)
    for v, cache in caches.items():
        out[f"format{v}_file_mb"] = os.path.getsize(os.path.join(
            stores[v], accounts[0], read_latest(os.path.join(stores[v], accounts[0])), "delta.safetensors")) / 2**20
        out[f"format{v}_cold_load_p50_ms"], out[f"format{v}_cold_load_p99_ms"] = pct(loads[v], 0.5), pct(loads[v], 0.99)
        cache.close()
    out["p50_ratio_format3_vs_2"] = out["format3_cold_load_p50_ms"] / out["format2_cold_load_p50_ms"]
    return out


def cache_latency(args, engine: DeltaBatchEngine, store: str, fp: str, accounts: list[str], nbytes: int,
                  shapes: dict) -> dict:
    """Cold loads (from the disk where the page cache can be dropped), then TTFT (cache lookup +
    prefill + first token) over a random request stream whose working set fits the device cache
    vs one 4x larger: with the host tier holding the working set (prefetched, timed, before the
    stream) and with no host tier."""
    out = {"page_cache_dropped": drop_page_cache()}
    cold = DeltaCache(store, DEV, device_budget=nbytes * len(accounts) * 2, host_budget=1, base_fingerprint=fp,
                      dtype=DTYPE)
    loads = []
    for a in accounts[: args.cold_loads]:
        t = time.perf_counter()
        cold_delta = cold.get(a).delta
        loads.append((time.perf_counter() - t) * 1e3)
    out["cold_load_p50_ms"], out["cold_load_p99_ms"] = pct(loads, 0.5), pct(loads, 0.99)
    cold.close()
    out["cold_load_phases_p50_ms"] = cold_phases(store, fp, accounts[args.cold_loads: 2 * args.cold_loads])
    if args.format_accounts:
        out["cold_load_by_format"] = by_format(args, shapes, fp, os.path.dirname(store))
    cached = max(2, len(accounts) // 4)
    g = torch.Generator().manual_seed(1)
    warm = requests(args, [None])[0]
    warm.max_tokens = 1
    warm.delta = cold_delta
    engine.generate([warm])  # first-use kernel compiles for the prefill shape: not part of any TTFT
    # The three streams take turns, request by request (so a drift of the device's clocks or the
    # allocator's first growth reaches them alike), each through its own cache: the all-hit stream's
    # working set fits its device tier; the other two ask for 4x as many accounts, one with the host
    # tier holding them (prefetched, as a replica's start does; pinned on a GPU), one with no host tier.
    streams = {"all_hit": (cached, False), "4x_working_set": (4 * cached, True),
               "4x_working_set_from_store": (4 * cached, False)}
    caches, picks, ttft, slowest = {}, {}, {}, {}
    for name, (working_set, host) in streams.items():
        caches[name] = cache = DeltaCache(store, DEV, device_budget=nbytes * cached + nbytes // 2,
                                          host_budget=nbytes * working_set + nbytes // 2 if host else 1,
                                          base_fingerprint=fp, dtype=DTYPE)
        for a in accounts[:cached]:
            cache.get(a)  # warm: the all-hit stream never misses
        if host:
            drop_page_cache()
            t = time.perf_counter()
            out[f"prefetched_{name}"] = len(cache.prefetch(accounts[:working_set]).result())
            out[f"prefetch_{name}_s"] = time.perf_counter() - t
        picks[name] = torch.randint(0, working_set, (args.ttft_requests,), generator=g).tolist()
        ttft[name], slowest[name] = [], []
    drop_page_cache()  # the from-store stream's misses read the disk
    with gc_pauses(out, "gc_during_ttft_streams"):
        ttft_streams(args, engine, accounts, caches, picks, ttft, slowest)
    for name, cache in caches.items():
        out[f"ttft_{name}_p50_ms"], out[f"ttft_{name}_p99_ms"] = pct(ttft[name], 0.5), pct(ttft[name], 0.99)
        out[f"ttft_{name}_slowest"] = sorted(slowest[name], key=lambda r: -r["ttft_ms"])[:3]
        out[f"misses_{name}"], out[f"host_hits_{name}"] = cache.stats["misses"], cache.stats["host_hits"]
        cache.close()
    for name in ("4x_working_set", "4x_working_set_from_store"):
        out[f"ttft_p99_ratio_{name}"] = out[f"ttft_{name}_p99_ms"] / out["ttft_all_hit_p99_ms"]
    return out


def ttft_streams(args, engine: DeltaBatchEngine, accounts: list[str], caches: dict, picks: dict, ttft: dict,
                 slowest: dict) -> None:
    """The streams' requests, taking turns: TTFT of each, and where a slow one's time went."""
    for i in range(args.ttft_requests):
        for name, cache in caches.items():
            req = requests(args, [None])[0]
            req.max_tokens = 1
            loads = cache.stats["store_loads"]
            t = time.perf_counter()
            req.delta = cache.get(accounts[picks[name][i]]).delta
            engine.generate([req])
            sync()
            ttft[name].append((time.perf_counter() - t) * 1e3)
            # where a slow request's time went: its store load (and the read within it), if it had one
            loaded = cache.stats["store_loads"] > loads
            slowest[name].append({"ttft_ms": ttft[name][-1], "load_ms": cache.stats["load_ms"][-1] if loaded else None,
                                  "read_ms": cache.stats["read_ms"][-1] if loaded else None})


