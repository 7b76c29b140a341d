"""One account's GSPF selection at tkllm-s scale (1.36B scores): what the packed trainer pays
after every account's warm-up, phase by phase (device-synced), through the Triton kernels and
through the torch path side by side (the same inputs, taking turns), with a profile of each.

    python benchmarks/selection_bench.py        # GPU; writes selection-<device>.json

Inputs are random: sensitivities |N(0,1)|-like sums, bf16 weights N(0, 0.02) in tkllm-s's linear
shapes (the selection's cost does not depend on the values, only on their count). `agreement`:
the share of the kernels' entries the torch path selects too (their tanh differs in the last bit).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from results_io import sync, write_result  # sibling module: this script's folder is on sys.path

from tkllm_ray.models import build_model
from tkllm_ray.sparse import selection as S
from tkllm_ray.sparse.sensitivity import target_linears

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _timed(fn) -> tuple[float, object]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return 1e3 * (time.perf_counter() - t), out


@contextlib.contextmanager
def _path(name: str):
    """`torch`: the selection without its Triton kernels (what ran before them)."""
    kernels = S._triton
    if name == "torch":
        S._triton = None
    try:
        yield
    finally:
        S._triton = kernels


def _select(weights: dict, seed: int, density: float) -> tuple[dict, dict]:
    """The packed trainer's selection of one account: z-score stats, standardize-and-weigh per module, top-k."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    sens = {n: torch.rand(w.shape, device=DEV, generator=g) for n, w in weights.items()}
    rep = {}
    rep["zstats_ms"], stats = _timed(lambda: S.zstats(sens, "global"))
    rep["weigh_ms"], _ = _timed(lambda: [S.weigh(sens[n], w, *stats[n]) for n, w in weights.items()])
    rep["top_k_ms"], sel = _timed(lambda: S.select(sens, None, density, inplace=True))
    rep["total_ms"] = rep["zstats_ms"] + rep["weigh_ms"] + rep["top_k_ms"]
    rep["k"] = sel.k
    return rep, sel.indices


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tkllm-s")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=dtype, device=DEV)
    weights = {n: m.weight for n, m in target_linears(model).items()}
    res = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "config": vars(args),
           "scores": sum(w.numel() for w in weights.values()), "kernels": [], "torch": [], "agreement": []}
    for r in range(args.reps):  # the two paths take turns on the same inputs
        picked = {}
        for path in ("kernels", "torch"):
            with _path(path):
                rep, picked[path] = _select(weights, r, args.density)
            res[path].append(rep)
            print(path, rep, flush=True)
        same = sum(int(torch.isin(picked["kernels"][n], picked["torch"][n]).sum()) for n in picked["kernels"])
        res["agreement"].append(same / rep["k"])
        del picked
    if DEV == "cuda":  # where each path's time goes: launches, host syncs, kernels
        from torch.profiler import ProfilerActivity, profile

        for path in ("kernels", "torch"):
            with _path(path), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                _select(weights, 0, args.density)
            print(path, prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    for path in ("kernels", "torch"):  # the median of the reps after the first (its compiles and allocations)
        reps = res[path][1:] or res[path]
        res[f"{path}_ms"] = {key: statistics.median(r[key] for r in reps)
                             for key in ("zstats_ms", "weigh_ms", "top_k_ms", "total_ms")}
    res["speedup"] = res["torch_ms"]["total_ms"] / res["kernels_ms"]["total_ms"]
    res["total_ms"] = res["kernels_ms"]["total_ms"]
    write_result(args.out, "selection", res["device"], res)
    return res


if __name__ == "__main__":
    main()
