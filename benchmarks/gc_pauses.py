"""How long a full garbage collection pauses a serving replica's Python process (every request in
flight waits for it): with the replica's imports (Ray Serve, FastAPI, torch), after `gc.freeze()`
(what the replica does once its base and engine are built), then with 1,000 tkllm-s-shaped deltas
in the host tier as the cache keeps them (two flat buffers each) and as served (each delta's
module mapping made: a FlatDelta, whose per-module views are made when read, not held); last,
after `torch.compile` has compiled an engine's decode step (`compile_decode`; inductor's CPU
backend here), before and after the engine freezes what that made
(`DeltaBatchEngine(freeze_gc=True)`, as a replica's engine does). CPU only.

    python benchmarks/gc_pauses.py        # writes gc-pauses-cpu-<machine>.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import time

import torch
from results_io import write_result  # sibling modules: this script's folder is on sys.path

from tkllm_ray.serve.delta_cache import CachedDelta


def full_collection_ms(reps: int = 3) -> float:
    """The fastest of `reps` full collections (the pause itself, not what else runs)."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - t) * 1e3)
    return min(times)


def compiled_step(model: str) -> dict:
    """Full collections after an engine has compiled its decode step (one request, so one span),
    then after the engine has frozen what compiling made (the same span again: no recompile)."""
    from tkllm_ray.models import build_model
    from tkllm_ray.serve.engine import DeltaBatchEngine, GenRequest

    gc.collect()
    engine = DeltaBatchEngine(build_model(model, vocab_size=512, seed=0, dtype=torch.float32), slots=4, max_len=64,
                              compile=True)
    before = len(gc.get_objects())
    t = time.perf_counter()
    engine.generate([GenRequest([5, 6, 7, 8], None, max_tokens=4)])
    out = {"compile_model": model, "compile_and_generate_s": time.perf_counter() - t,
           "objects_made_compiling": len(gc.get_objects()) - before, "after_compiling_ms": full_collection_ms()}
    engine.freeze_gc, engine._warm = True, set()  # as a replica's engine: freezes at its next warm-up
    engine.generate([GenRequest([5, 6, 7, 8], None, max_tokens=4)])
    out["after_engine_freeze_ms"] = full_collection_ms()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--compile-model", default="tkllm-s", help="the model whose decode step is compiled "
                    "(tkllm-s: ~30 s on 2 cores; '' to skip)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    importlib.import_module("tkllm_ray.serve.app")  # the replica's imports (Ray Serve, FastAPI, ...)
    res = {"config": vars(args), "tracked_objects_at_start": len(gc.get_objects()),
           "imports_ms": full_collection_ms()}
    gc.freeze()
    res["after_freeze_ms"] = full_collection_ms()
    layout = [(f"model.layers.{layer}.m{i}", 100) for layer in range(24) for i in range(7)]  # tkllm-s: 168 modules
    items = [CachedDelta._views(f"a{a}", "v", {}, torch.zeros(16800, dtype=torch.int32), torch.zeros(16800),
                                list(layout)) for a in range(args.accounts)]
    res["host_tier_ms"] = full_collection_ms()
    for item in items:
        item.delta  # noqa: B018  (the module mapping a request reads, made)
    res["host_tier_served_ms"] = full_collection_ms()
    del items
    if args.compile_model:
        res.update(compiled_step(args.compile_model))
    gc.unfreeze()
    print(res, flush=True)
    write_result(args.out, "gc-pauses", "cpu-" + platform.machine(), res)
    return res


if __name__ == "__main__":
    main()
