"""Where a packed step's sparse work goes, at tkllm-s shapes: the segmented kernels (forward,
input gradient, sampled weight gradient) over a sweep of tile sizes, next to the dense GEMM of
the same layer, and GSPF selection (scoring, k-th largest score by sampling and by radix select,
the final gather) over a tkllm-s-sized set of sensitivities; then the op's sparse route vs its dense-GEMM
route (segmented_dense) per layer shape and density, which sets the density from which training
takes the dense route.

    python benchmarks/packed_kernels.py            # GPU; writes packed-kernels-<device>.json

`packed_bench.py --tune` runs the sweep first and trains with the fastest tiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import torch
from results_io import sync, write_result  # sibling module: this script's folder is on sys.path

SHAPES = {"up_proj": (2048, 5632), "down_proj": (5632, 2048)}  # (in, out) of tkllm-s's MLP
ROUTE_SHAPES = {**SHAPES, "q_proj": (2048, 2048), "lm_head": (2048, 32000)}
DENSITIES = (0.001, 0.002, 0.003, 0.005, 0.01, 0.04)  # GSPF puts percents on the head, fractions elsewhere
CSR_GRID = [{"LINES": ln, "BLOCK_E": be, "BLOCK_T": bt, "num_warps": w}
            for ln, be, bt, w in itertools.product((16, 32), (32, 64), (64, 128), (4, 8))]
SDDMM_GRID = [{"LINES": ln, "BLOCK_E": be, "BLOCK_T": bt, "SPLIT": sp, "num_warps": 4}
              for ln, be, bt, sp in itertools.product((16, 32), (32, 64), (32, 64), (1, 2, 4))]
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: Triton's interpreter, to check this script


def _ms(fn, reps: int = 5) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps * 1e3


def _segments(users: int, tokens: int, din: int, dout: int, density: float, seed: int = 0):
    from tkllm_ray.sparse.segmented import Segments

    g = torch.Generator(device=DEV).manual_seed(seed)
    k = round(density * din * dout)
    idx = [torch.sort(torch.randperm(din * dout, device=DEV, generator=g)[:k]).values for _ in range(users)]
    return Segments.build([tokens] * users, idx, din, device=DEV, check=False), users * k


def sweep(users: int = 16, tokens: int = 1024, density: float = 0.003, shapes: dict = SHAPES,
          csr_grid: list = CSR_GRID, sddmm_grid: list = SDDMM_GRID) -> dict:
    """Time each kernel per tile config on both MLP shapes; set segmented_triton.CONFIG to the
    fastest (summed over shapes) and return the table. The forward and input-gradient kernels add
    into an output in place, so repeated timing calls only grow its values; the dense GEMM is the
    base linear's own forward at the same shape, for scale."""
    from tkllm_ray.sparse import segmented_triton as K
    from tkllm_ray.sparse.sddmm_triton import transpose

    out = {"users": users, "tokens_per_user": tokens, "density": density, "shapes": {}}
    totals = {"csr": {}, "sddmm": {}}
    for name, (din, dout) in shapes.items():
        seg, k = _segments(users, tokens, din, dout, density)
        x = torch.randn(users * tokens, din, device=DEV, dtype=torch.bfloat16)
        dy = torch.randn(users * tokens, dout, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(dout, din, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(k, device=DEV)
        xT, dyT = transpose(x), transpose(dy)
        y, dx = torch.zeros_like(dy), torch.zeros_like(x)
        row = {"entries": k, "dense_gemm_ms": _ms(lambda: x @ w.t()), "transpose_ms": _ms(lambda: transpose(x)),
               "csr": {}, "sddmm": {}}
        for cfg in csr_grid:
            K.CONFIG["csr"] = cfg
            key = json.dumps(cfg, sort_keys=True)
            row["csr"][key] = {
                "forward_ms": _ms(lambda: K._csr_into(y, xT, v, K._plan_rows(seg, dout), seg)),
                "input_grad_ms": _ms(lambda: K._csr_into(dx, dyT, v, K._plan_cols(seg, din), seg))}
            totals["csr"][key] = totals["csr"].get(key, 0) + sum(row["csr"][key].values())
        for cfg in sddmm_grid:
            K.CONFIG["sddmm"] = cfg
            key = json.dumps(cfg, sort_keys=True)
            row["sddmm"][key] = _ms(lambda: K.sampled_grad_T(dyT, xT, seg, dout))
            totals["sddmm"][key] = totals["sddmm"].get(key, 0) + row["sddmm"][key]
        out["shapes"][name] = row
    best = {kind: json.loads(min(t, key=t.get)) for kind, t in totals.items()}
    K.CONFIG.update(best)
    out["best"] = best
    out["best_ms"] = {name: {"forward": row["csr"][json.dumps(best["csr"], sort_keys=True)]["forward_ms"],
                             "input_grad": row["csr"][json.dumps(best["csr"], sort_keys=True)]["input_grad_ms"],
                             "sampled_grad": row["sddmm"][json.dumps(best["sddmm"], sort_keys=True)],
                             "transpose": row["transpose_ms"], "dense_gemm": row["dense_gemm_ms"]}
                       for name, row in out["shapes"].items()}
    return out


def route_sweep(users: int = 16, tokens: int = 1024, densities=DENSITIES, shapes: dict = ROUTE_SHAPES) -> dict:
    """The segmented op's two routes (sparse kernels with the current tiles, dense GEMMs) per layer
    shape and density: forward, input gradient and sampled weight gradient. Sets
    CONFIG["dense"]["min_density"] to the lowest density from which the dense route is faster on
    every shape (all three ops summed), or CONFIG["dense"] = None if it never is."""
    from tkllm_ray.sparse import segmented_dense as D
    from tkllm_ray.sparse import segmented_triton as K
    from tkllm_ray.sparse.sddmm_triton import transpose

    out = {"users": users, "tokens_per_user": tokens, "shapes": {}}
    dense_wins = {d: True for d in densities}
    for name, (din, dout) in shapes.items():
        x = torch.randn(users * tokens, din, device=DEV, dtype=torch.bfloat16)
        dy = torch.randn(users * tokens, dout, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(dout, din, device=DEV, dtype=torch.bfloat16)
        y, dx = torch.zeros_like(dy), torch.zeros_like(x)
        rows = {}
        for d in densities:
            seg, k = _segments(users, tokens, din, dout, d)
            v = torch.randn(k, device=DEV)
            xT, dyT = transpose(x), transpose(dy)
            sparse = {"forward_ms": _ms(lambda: K._csr_into(y, xT, v, K._plan_rows(seg, dout), seg)),
                      "input_grad_ms": _ms(lambda: K._csr_into(dx, dyT, v, K._plan_cols(seg, din), seg)),
                      "sampled_grad_ms": _ms(lambda: K.sampled_grad_T(dyT, xT, seg, dout)),
                      "transposes_ms": 2 * _ms(lambda: transpose(x))}
            dense = {"forward_ms": _ms(lambda: D.add_forward(y, x, v, seg, False)),
                     "input_grad_ms": _ms(lambda: D.backward(dy, None, v, seg, dx, False)),
                     "sampled_grad_ms": _ms(lambda: D.backward(dy, x, v, seg, None, True))}
            sparse["total_ms"], dense["total_ms"] = sum(sparse.values()), sum(dense.values())
            # The fused op's merged-weight route replaces the base GEMM and the delta term together.
            merged = {"linear_ms": _ms(lambda: D.merged_linear(x, w, None, v, seg)),
                      "input_grad_ms": _ms(lambda: D.merged_backward(dy, x, w, v, seg, True, False))}
            rows[str(d)] = {"entries": k, "sparse": sparse, "dense": dense, "merged": merged}
            dense_wins[d] &= dense["total_ms"] < sparse["total_ms"]
        out["shapes"][name] = {"dense_gemm_ms": _ms(lambda: x @ w.t()), "densities": rows}
        torch.cuda.empty_cache()
    wins = [d for d in densities if all(dense_wins[e] for e in densities if e >= d)]
    keep = K.CONFIG["dense"] or {"min_tokens": 128, "merge": False}
    K.CONFIG["dense"] = {**keep, "min_density": min(wins)} if wins else None
    out["chosen"] = K.CONFIG["dense"]
    return out


def selection_times(model: str = "tkllm-s", density: float = 0.003) -> dict:
    """One GSPF selection over a tkllm-s-sized set of random sensitivities, phase by phase."""
    from tkllm_ray.models import build_model
    from tkllm_ray.sparse import selection as S
    from tkllm_ray.sparse.sensitivity import target_linears

    base = build_model(model, vocab_size=32000, seed=0, dtype=torch.bfloat16, device=DEV)
    weights = {n: m.weight for n, m in target_linears(base).items()}
    g = torch.Generator(device=DEV).manual_seed(0)
    sens = {n: torch.rand(w.shape, device=DEV, generator=g).pow_(4) for n, w in weights.items()}
    n = sum(s.numel() for s in sens.values())
    k = S.budget(density, n)
    out = {"target_weights": n, "k": k}
    sync()
    t = time.perf_counter()
    sc = S.scores(sens, weights, "global", inplace=True)
    sync()
    out["scores_s"] = time.perf_counter() - t
    for name, fn in (("kth_sampled", S._kth_largest_key), ("kth_radix", S._radix_kth)):
        t = time.perf_counter()
        out[name + "_key"] = fn(sc, k)  # the two must agree
        sync()
        out[name + "_s"] = time.perf_counter() - t
    t = time.perf_counter()
    idx = S.top_k(sc, k)
    sync()
    out["top_k_total_s"] = time.perf_counter() - t
    out["selected"] = sum(i.numel() for i in idx.values())
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per user in the micro-batch")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("packed_kernels.py times CUDA kernels: it needs a GPU")
    result = {"device": torch.cuda.get_device_name(0), "kernels": sweep(args.users, args.tokens)}
    result["routes"] = route_sweep(args.users, args.tokens)  # with the tiles just chosen
    result["selection"] = selection_times()
    write_result(args.out, "packed-kernels", result["device"], result)
    print(json.dumps({"best": result["kernels"]["best"], "best_ms": result["kernels"]["best_ms"],
                      "dense_route": result["routes"]["chosen"],
                      "selection": result["selection"]}, indent=1))
    return result


if __name__ == "__main__":
    main()
