"""The segmented forward at decode shape (serving: one token per account, 64 accounts), at tkllm-s's
module shapes, as the engine runs it: 64 accounts' deltas in the slot pool (serve/slots.py), q/k/v
and gate/up each one grouped launch over their stacked output, o/down/lm_head one launch each. Each
kind is timed over all 24 layers' modules in turn (each layer's entries are its own, so they come
from DRAM, as in a decode step, not from a warm L2), per tile config; the fastest per kind become
CONFIG["decode_by_shape"] (keyed by the stacked shape), next to the dense GEMM at the same shape.

    python benchmarks/decode_kernels.py          # GPU; writes decode-kernels-<device>.json

A second sweep does the same at a prefill's shape (32 prompt tokens per account) for the
line-block kernel's tiles.

`serve_bench.py --tune` runs the sweeps first and serves with the fastest tiles. Bandwidth counts the
entry bytes the kernel reads (the pool's int16 column and bf16 value: 4 bytes an entry). Times are
device times: each call replayed from a CUDA graph, as serving runs it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from types import SimpleNamespace

import torch
from packed_kernels import _ms, _segments  # sibling modules: this script's folder is on sys.path
from results_io import sync, write_result

# (in, out) of tkllm-s's linears, with how many of each the model has (the prefill sweep)
SHAPES = {"attn": ((2048, 2048), 96), "up_gate": ((2048, 5632), 48), "down": ((5632, 2048), 24),
          "lm_head": ((2048, 32000), 1)}
HIDDEN, INTER, LAYERS, VOCAB = 2048, 5632, 24, 32000
# a decode step's delta launches by kind: (the modules of one launch in a layer, (out, in) each)
KINDS = {"qkv": ((("self_attn.q_proj", HIDDEN), ("self_attn.k_proj", HIDDEN), ("self_attn.v_proj", HIDDEN)), HIDDEN),
         "o": ((("self_attn.o_proj", HIDDEN),), HIDDEN),
         "gate_up": ((("mlp.gate_proj", INTER), ("mlp.up_proj", INTER)), HIDDEN),
         "down": ((("mlp.down_proj", HIDDEN),), INTER)}
GRID = [{"LINES": ln, "BLOCK_E": be, "num_warps": w, "PREFETCH": pf}
        for ln, be, w, pf in itertools.product((64, 128, 256, 512), (256, 512, 1024), (2, 4), (False, True))]
TILE_KEYS = ("LINES", "BLOCK_E", "num_warps", "PREFETCH")
STEP_KINDS = {**KINDS, "lm_head": ((("lm_head", VOCAB),), HIDDEN)}  # every delta launch of a decode step
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


def _pool(users: int, density: float, layers: int, wide_pointers: bool = False, pack: bool = True):
    """A slot pool of `users` random accounts over tkllm-s's linears (`layers` of its layers and
    lm_head; only the shapes are needed, so the linears are shapes on the meta device); the same
    accounts for the same arguments (whatever `wide_pointers` and `pack`)."""
    from tkllm_ray.serve.slots import SlotDeltas

    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    shapes = {f"model.layers.{i}.{n}": (o, KINDS[k][1]) for i in range(layers) for k in KINDS for n, o in KINDS[k][0]}
    shapes["lm_head"] = (VOCAB, HIDDEN)
    lins = {n: SimpleNamespace(weight=torch.empty(s, device="meta")) for n, s in shapes.items()}
    table = SlotDeltas(users, lins, dtype, torch.device(DEV), wide_pointers=wide_pointers, pack=pack)
    g = torch.Generator(device=DEV).manual_seed(0)
    accounts = []
    for _ in range(users):
        d = {}
        for n, (o, i) in shapes.items():
            idx = torch.randint(0, o * i, (round(density * o * i),), device=DEV, generator=g).unique()
            d[n] = (idx, torch.randn(idx.numel(), device=DEV, generator=g).to(dtype))
        accounts.append(d)
    table.assign(accounts)
    return table, shapes, sum(table._entries(d) for d in accounts)


def _module_entries(table, name: str) -> int:
    """Entries of module `name` over every slot of the pool."""
    ptr = table.ptr[: table.slots * table.P].view(table.slots, table.P)  # (not the pool's empty run after them)
    off = table.offsets[table.module_index[name]]
    return int((ptr[:, off + table.shapes[name][0]] - ptr[:, off]).sum())


def _prefixes(kind: str, layers: int) -> list[str]:
    """The module-name prefixes of a kind's launches in one step: each layer's, or lm_head's one."""
    return [""] if kind == "lm_head" else [f"model.layers.{i}." for i in range(layers)]


def _layer_ms(launch, layers: int) -> float:
    """Device ms a launch of `launch` (which runs a kind over `layers` layers), from CUDA graphs."""
    return _graph_ms(launch, reps=max(1, 20 // layers)) / layers


def _taking_turns(launches: dict, layers: int, reps: int) -> dict:
    """{name: [ms a layer, per run]} of `launches` (each over `layers` layers), run r of each
    before run r + 1 of any, so a drift of the device's clocks reaches them alike."""
    times: dict[str, list[float]] = {n: [] for n in launches}
    for _ in range(reps):
        for n, fn in launches.items():
            times[n].append(_layer_ms(fn, layers))
    return times


def _step_ms(ms_by_kind: dict, layers: int) -> float:
    """A decode step's total from each kind's ms a layer (lm_head's once)."""
    return sum(ms * (1 if k == "lm_head" else layers) for k, ms in ms_by_kind.items())


def _launcher(table, members: tuple, width: int, prefixes: list[str], x: torch.Tensor, y: torch.Tensor):
    """One kind's decode launches over every layer of `prefixes`, as the engine makes them: one
    grouped launch a layer for q/k/v and gate/up, one launch a module otherwise (the tiles as
    CONFIG has them when this is called)."""
    from tkllm_ray.sparse import segmented_triton as K

    cols = [sum(o for _, o in members[:j]) for j in range(len(members))]
    groups = [table.add_group(tuple((p + n, c) for (n, _), c in zip(members, cols))) for p in prefixes]
    single = [table.segs[p + members[0][0]] for p in prefixes]

    def launch():
        if len(members) > 1:
            for grp in groups:
                table.group_add(y, x, grp)
        else:
            for seg in single:
                K._decode_into(y, x, table.vals, seg._plans[f"rows{width}"], seg)
    return launch


def sweep(users: int = 64, density: float = 0.003, layers: int = LAYERS, grid: list = GRID) -> dict:
    """Time each kind of decode launch per tile config over `layers` layers in turn (inside CUDA
    graphs); set CONFIG["decode_by_shape"] to each kind's fastest (the stacked shape for a group:
    "6144x2048" for q/k/v) and CONFIG["decode"] to the fastest overall; return the table."""
    from tkllm_ray.sparse import segmented_triton as K

    table, _, total = _pool(users, density, layers)
    dtype = table.dtype
    out = {"users": users, "tokens_per_user": 1, "density": density, "layers": layers, "entries": total, "kinds": {}}
    totals: dict[int, float] = {}
    for kind, (members, din) in STEP_KINDS.items():
        width = sum(o for _, o in members)
        key = f"{width}x{din}"
        x = torch.randn(users, din, device=DEV, dtype=dtype)
        y = torch.zeros(users, width, device=DEV, dtype=dtype)
        w = torch.randn(width, din, device=DEV, dtype=dtype)
        prefixes = _prefixes(kind, layers)
        row = {"shape": key, "entries_per_layer": sum(_module_entries(table, p + n) for p in prefixes
                                                      for n, _ in members) // len(prefixes),
               "gemm_ms": _graph_ms(lambda: torch.nn.functional.linear(x, w)), "decode": []}
        for i, cfg in enumerate(grid):
            K.CONFIG["decode_by_shape"][key] = cfg
            ms = _layer_ms(_launcher(table, members, width, prefixes, x, y), len(prefixes))
            row["decode"].append({**cfg, "ms": ms, "entry_gb_per_s": row["entries_per_layer"] * 4 / ms / 1e6})
            totals[i] = totals.get(i, 0.0) + ms * len(prefixes)
        best = min(row["decode"], key=lambda r: r["ms"])
        row["best_decode_ms"], row["best_decode_gb_per_s"] = best["ms"], best["entry_gb_per_s"]
        K.CONFIG["decode_by_shape"][key] = {c: best[c] for c in TILE_KEYS}
        out["kinds"][kind] = row
        print(f"{kind} ({key}): gemm {row['gemm_ms']:.4f} ms, decode best {best['ms']:.4f} ms "
              f"({best['entry_gb_per_s']:.0f} GB/s) {K.CONFIG['decode_by_shape'][key]}", flush=True)
    best = min(totals, key=totals.get)
    out["chosen"], out["chosen_by_shape"] = grid[best], dict(K.CONFIG["decode_by_shape"])
    K.CONFIG["decode"] = dict(grid[best])
    out["model_ms_per_step"] = {"decode_one_config": totals[best],
                                "decode_per_kind_best": _step_ms({k: r["best_decode_ms"] for k, r in out["kinds"].items()},
                                                                 layers),
                                "gemm": _step_ms({k: r["gemm_ms"] for k, r in out["kinds"].items()}, layers)}
    return out


def pointer_widths(users: int = 64, density: float = 0.003, layers: int = LAYERS, reps: int = 5) -> dict:
    """Each kind's decode launches over `layers` layers with the pool's line pointers in int32 (as
    served) and in int64 (as before), the same accounts in both pools, the two taking turns `reps`
    times (medians); the tiles as CONFIG has them."""
    import statistics

    pools = {"int32": _pool(users, density, layers)[0], "int64": _pool(users, density, layers, wide_pointers=True)[0]}
    dtype = pools["int32"].dtype
    out: dict = {"users": users, "density": density, "layers": layers, "kinds": {}}
    for kind, (members, din) in STEP_KINDS.items():
        width = sum(o for _, o in members)
        x = torch.randn(users, din, device=DEV, dtype=dtype)
        y = torch.zeros(users, width, device=DEV, dtype=dtype)
        prefixes = _prefixes(kind, layers)
        times = _taking_turns({w: _launcher(t, members, width, prefixes, x, y) for w, t in pools.items()},
                              len(prefixes), reps)
        row = {f"{w}_ms": statistics.median(v) for w, v in times.items()}
        row["runs"] = times
        out["kinds"][kind] = row
        print(f"pointers {kind}: int32 {row['int32_ms'] * 1e3:.1f} us, int64 {row['int64_ms'] * 1e3:.1f} us", flush=True)
    for w in pools:
        out[f"model_ms_per_step_{w}"] = _step_ms({k: r[f"{w}_ms"] for k, r in out["kinds"].items()}, layers)
    out["ratio_int32_vs_int64"] = out["model_ms_per_step_int32"] / out["model_ms_per_step_int64"]
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
    ap.add_argument("--pointers", action="store_true", help="only compare the pool's line pointers in int32 "
                    "and int64, with the tiles in CONFIG (writes decode-pointers-<device>.json)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill sweep")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    device = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    if args.pointers:
        res = {**pointer_widths(args.users, args.density), "device": device}
        write_result(args.out, "decode-pointers", device, res)
        return res
    res = sweep(args.users, args.density)
    if not args.no_prefill:
        res["prefill"] = prefill_sweep(args.users, args.prefill_tokens, args.density)
    res["device"] = device
    write_result(args.out, "decode-kernels", res["device"], res)
    return res


if __name__ == "__main__":
    main()
