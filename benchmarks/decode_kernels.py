"""The segmented forward at decode shape (serving: one token per account, 64 accounts), at tkllm-s's
module shapes: the streaming decode kernel over a sweep of tile sizes, next to the line-block
(tensor-core) kernel the training path uses and the base layer's dense GEMM at the same batch.

    python benchmarks/decode_kernels.py          # GPU; writes decode-kernels-<device>.json

`serve_bench.py --tune` runs the sweep first and serves with the fastest tiles. Bandwidth counts the
entry bytes the kernel must read (int32 column, int32 row, bf16 value: 10 bytes per entry).
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
from packed_kernels import _ms, _segments  # sibling modules: this script's folder is on sys.path
from results_io import write_result

# (in, out) of tkllm-s's linears, with how many of each the model has
SHAPES = {"attn": ((2048, 2048), 96), "up_gate": ((2048, 5632), 48), "down": ((5632, 2048), 24),
          "lm_head": ((2048, 32000), 1)}
GRID = [{"LINES": ln, "BLOCK_E": be, "num_warps": w}
        for ln, be, w in itertools.product((16, 32, 64, 128), (128, 256, 512, 1024), (2, 4, 8))]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sweep(users: int = 64, tokens: int = 1, density: float = 0.003, shapes: dict = SHAPES, grid: list = GRID) -> dict:
    """Time the decode kernel per tile config on every shape; set CONFIG["decode"] to the fastest
    (per-layer time weighted by how many such layers the model has) and return the table."""
    from tkllm_ray.sparse import segmented_triton as K

    out = {"users": users, "tokens_per_user": tokens, "density": density, "shapes": {}}
    totals: dict[int, float] = {}
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    for name, ((din, dout), count) in shapes.items():
        seg, k = _segments(users, tokens, din, dout, density)
        x = torch.randn(users * tokens, din, device=DEV, dtype=dtype)
        w = torch.randn(dout, din, device=DEV, dtype=dtype)
        v = torch.randn(k, device=DEV, dtype=dtype)
        y = torch.zeros(users * tokens, dout, device=DEV, dtype=dtype)
        plan = K._plan_rows(seg, dout)
        row = {"entries": k, "gemm_ms": _ms(lambda: torch.nn.functional.linear(x, w)),
               "line_block_ms": _ms(lambda: K._csr_into(y, K.transpose(x), v, plan, seg)), "decode": []}
        for i, cfg in enumerate(grid):
            K.CONFIG["decode"] = cfg
            ms = _ms(lambda: K._decode_into(y, x, v, plan, seg))
            row["decode"].append({**cfg, "ms": ms, "entry_gb_per_s": k * 10 / ms / 1e6})
            totals[i] = totals.get(i, 0.0) + ms * count
        best = min(row["decode"], key=lambda r: r["ms"])
        row["best_decode_ms"], row["best_decode_gb_per_s"] = best["ms"], best["entry_gb_per_s"]
        out["shapes"][name] = row
        print(f"{name}: gemm {row['gemm_ms']:.3f} ms, line-block {row['line_block_ms']:.3f} ms, "
              f"decode best {best['ms']:.3f} ms ({best['entry_gb_per_s']:.0f} GB/s)", flush=True)
    best = min(totals, key=totals.get)
    K.CONFIG["decode"] = grid[best]
    out["chosen"] = grid[best]
    out["model_ms_per_step"] = {"decode": totals[best],
                                "line_block": sum(r["line_block_ms"] * shapes[n][1] for n, r in out["shapes"].items()),
                                "gemm": sum(r["gemm_ms"] * shapes[n][1] for n, r in out["shapes"].items())}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    res = sweep(args.users, 1, args.density)
    res["device"] = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    write_result(args.out, "decode-kernels", res["device"], res)
    return res


if __name__ == "__main__":
    main()
