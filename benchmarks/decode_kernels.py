"""The segmented forward at decode shape (serving: one token per account, 64 accounts), at tkllm-s's
module shapes: the streaming decode kernel over a sweep of tile sizes, next to the line-block
(tensor-core) kernel the training path uses and the base layer's dense GEMM at the same batch.

    python benchmarks/decode_kernels.py          # GPU; writes decode-kernels-<device>.json

A second sweep does the same at a prefill's shape (32 prompt tokens per account) for the
line-block kernel's tiles.

`serve_bench.py --tune` runs the sweeps first and serves with the fastest tiles. Bandwidth counts the
entry bytes the kernel reads (int32 column, bf16 value: 6 bytes an entry; the serving pool's int16
columns make it 4). Times are device times: each call replayed from a CUDA graph, as serving runs it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
from packed_kernels import _ms, _segments  # sibling modules: this script's folder is on sys.path
from results_io import sync, write_result

# (in, out) of tkllm-s's linears, with how many of each the model has
SHAPES = {"attn": ((2048, 2048), 96), "up_gate": ((2048, 5632), 48), "down": ((5632, 2048), 24),
          "lm_head": ((2048, 32000), 1)}
GRID = [{"LINES": ln, "BLOCK_E": be, "num_warps": w}
        for ln, be, w in itertools.product((32, 64, 128, 256, 512), (128, 256, 512, 1024), (2, 4, 8))]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _graph_ms(fn, reps: int = 20) -> float:
    """Device time per call: `reps` calls captured in one CUDA graph and replayed (serving runs
    them inside graphs, so CPU launch overhead, which dominates a plain timing of a small
    kernel, is not what it pays). Falls back to plain timing on the CPU."""
    if DEV != "cuda":
        return _ms(fn)
    fn()
    sync()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    sync()
    t = time.perf_counter()
    for _ in range(3):
        graph.replay()
    sync()
    return (time.perf_counter() - t) / (3 * reps) * 1e3


def _operands(users: int, tokens: int, din: int, dout: int, density: float) -> tuple:
    """One layer's random batch: (segments, entries, x, W, values, output, the rows plan)."""
    from tkllm_ray.sparse import segmented_triton as K

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    seg, k = _segments(users, tokens, din, dout, density)
    x = torch.randn(users * tokens, din, device=DEV, dtype=dtype)
    w = torch.randn(dout, din, device=DEV, dtype=dtype)
    v = torch.randn(k, device=DEV, dtype=dtype)
    y = torch.zeros(users * tokens, dout, device=DEV, dtype=dtype)
    return seg, k, x, w, v, y, K._plan_rows(seg, dout)


def sweep(users: int = 64, tokens: int = 1, density: float = 0.003, shapes: dict = SHAPES, grid: list = GRID) -> dict:
    """Time the decode kernel per tile config on every shape (inside CUDA graphs); set
    CONFIG["decode_by_shape"] to each shape's fastest and CONFIG["decode"] to the fastest overall
    (per-layer time weighted by how many such layers the model has); return the table."""
    from tkllm_ray.sparse import segmented_triton as K

    out = {"users": users, "tokens_per_user": tokens, "density": density, "shapes": {}}
    totals: dict[int, float] = {}
    for name, ((din, dout), count) in shapes.items():
        seg, k, x, w, v, y, plan = _operands(users, tokens, din, dout, density)
        K.CONFIG["decode_by_shape"].pop(f"{dout}x{din}", None)  # else every grid point would run that shape's tiles
        row = {"entries": k, "gemm_ms": _graph_ms(lambda: torch.nn.functional.linear(x, w)),
               "line_block_ms": _graph_ms(lambda: K._csr_into(y, K.transpose(x), v, plan, seg)), "decode": []}
        for i, cfg in enumerate(grid):
            K.CONFIG["decode"] = cfg
            ms = _graph_ms(lambda: K._decode_into(y, x, v, plan, seg))
            row["decode"].append({**cfg, "ms": ms, "entry_gb_per_s": k * 6 / ms / 1e6})
            totals[i] = totals.get(i, 0.0) + ms * count
        best = min(row["decode"], key=lambda r: r["ms"])
        row["best_decode_ms"], row["best_decode_gb_per_s"] = best["ms"], best["entry_gb_per_s"]
        K.CONFIG["decode_by_shape"][f"{dout}x{din}"] = {c: best[c] for c in ("LINES", "BLOCK_E", "num_warps")}
        out["shapes"][name] = row
        print(f"{name}: gemm {row['gemm_ms']:.3f} ms, line-block {row['line_block_ms']:.3f} ms, "
              f"decode best {best['ms']:.3f} ms ({best['entry_gb_per_s']:.0f} GB/s)", flush=True)
    best = min(totals, key=totals.get)
    K.CONFIG["decode"] = grid[best]
    out["chosen"], out["chosen_by_shape"] = grid[best], dict(K.CONFIG["decode_by_shape"])
    out["model_ms_per_step"] = {"decode": totals[best],
                                "decode_per_shape_best": sum(r["best_decode_ms"] * shapes[n][1]
                                                             for n, r in out["shapes"].items()),
                                "line_block": sum(r["line_block_ms"] * shapes[n][1] for n, r in out["shapes"].items()),
                                "gemm": sum(r["gemm_ms"] * shapes[n][1] for n, r in out["shapes"].items())}
    return out


PREFILL_GRID = [{"LINES": ln, "BLOCK_E": be, "BLOCK_T": 128, "num_warps": w}
                for ln, be, w in itertools.product((16, 32, 64), (32, 64, 128), (4, 8))]


def prefill_sweep(users: int = 64, tokens: int = 32, density: float = 0.003, shapes: dict = SHAPES,
                  grid: list = PREFILL_GRID) -> dict:
    """The same at a serving prefill's shape (`tokens` prompt tokens per account; lm_head only
    sees each prompt's last token, so it is left out): the line-block kernel per tile config,
    and the streaming kernel looping over the tokens. Sets CONFIG["csr_prefill"] to the fastest
    line-block tiles over the model's layers."""
    from tkllm_ray.sparse import segmented_triton as K

    shapes = {n: v for n, v in shapes.items() if n != "lm_head"}
    out = {"users": users, "tokens_per_user": tokens, "density": density, "shapes": {}}
    totals: dict[int, float] = {}
    stream, default = 0.0, grid.index(K.CONFIG["csr_prefill"]) if K.CONFIG["csr_prefill"] in grid else None
    for name, ((din, dout), count) in shapes.items():
        seg, k, x, w, v, y, plan = _operands(users, tokens, din, dout, density)
        row = {"entries": k, "gemm_ms": _graph_ms(lambda: torch.nn.functional.linear(x, w)),
               "streaming_ms": _graph_ms(lambda: K._decode_into(y, x, v, plan, seg)), "line_block": []}
        stream += row["streaming_ms"] * count
        for i, cfg in enumerate(grid):
            K.CONFIG["csr_prefill"] = cfg
            ms = _graph_ms(lambda: K._csr_into(y, K.transpose(x), v, plan, seg))
            row["line_block"].append({**cfg, "ms": ms})
            totals[i] = totals.get(i, 0.0) + ms * count
        best = min(row["line_block"], key=lambda r: r["ms"])
        row["best_line_block_ms"] = best["ms"]
        out["shapes"][name] = row
        print(f"prefill {name}: gemm {row['gemm_ms']:.3f} ms, streaming {row['streaming_ms']:.3f} ms, "
              f"line-block best {best['ms']:.3f} ms ({ {c: best[c] for c in ('LINES', 'BLOCK_E', 'num_warps')} })",
              flush=True)
    best = min(totals, key=totals.get)
    K.CONFIG["csr_prefill"] = grid[best]
    out["chosen"] = grid[best]
    out["model_ms_per_prefill"] = {"line_block": totals[best], "line_block_default": totals.get(default), "streaming": stream,
                                   "gemm": sum(r["gemm_ms"] * shapes[n][1] for n, r in out["shapes"].items())}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--prefill-tokens", type=int, default=32, help="prompt tokens per account in the prefill sweep")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    res = sweep(args.users, 1, args.density)
    res["prefill"] = prefill_sweep(args.users, args.prefill_tokens, args.density)
    res["device"] = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    write_result(args.out, "decode-kernels", res["device"], res)
    return res


if __name__ == "__main__":
    main()
