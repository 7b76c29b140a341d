"""One account's GSPF selection at tkllm-s scale (1.36B scores): what the packed trainer pays
after every account's warm-up, phase by phase (device-synced), with a profile of the top-k.

    python benchmarks/selection_bench.py        # GPU; writes selection-<device>.json

Inputs are random: sensitivities |N(0,1)|-like sums, bf16 weights N(0, 0.02) in tkllm-s's linear
shapes (the selection's cost does not depend on the values, only on their count).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from results_io import sync, write_result  # sibling module: this script's folder is on sys.path

from tkllm_ray.models import build_model
from tkllm_ray.sparse.selection import select, standardize, weigh
from tkllm_ray.sparse.sensitivity import target_linears

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _timed(fn) -> tuple[float, object]:
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return 1e3 * (time.perf_counter() - t), out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tkllm-s")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    model = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=dtype, device=DEV)
    weights = {n: m.weight for n, m in target_linears(model).items()}
    g = torch.Generator(device=DEV).manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "config": vars(args),
           "scores": sum(w.numel() for w in weights.values()), "reps": []}
    for _ in range(args.reps):
        sens = {n: torch.rand(w.shape, device=DEV, generator=g) for n, w in weights.items()}
        rep = {}
        rep["standardize_ms"], _ = _timed(lambda: standardize(sens, "global", inplace=True))
        rep["weigh_ms"], _ = _timed(lambda: [weigh(sens[n], w) for n, w in weights.items()])
        rep["top_k_ms"], sel = _timed(lambda: select(sens, None, args.density, inplace=True))
        rep["total_ms"] = rep["standardize_ms"] + rep["weigh_ms"] + rep["top_k_ms"]
        rep["k"] = sel.k
        res["reps"].append(rep)
        print(rep, flush=True)
        del sens, sel
    if DEV == "cuda":  # where the top-k's time goes: launches, host syncs, kernels
        from torch.profiler import ProfilerActivity, profile

        sens = {n: torch.rand(w.shape, device=DEV, generator=g) for n, w in weights.items()}
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            select(sens, None, args.density, inplace=True)
            sync()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10), flush=True)
        del sens
    last = res["reps"][-1]
    res.update({k: last[k] for k in ("standardize_ms", "weigh_ms", "top_k_ms", "total_ms")})
    write_result(args.out, "selection", res["device"], res)
    return res


if __name__ == "__main__":
    main()
