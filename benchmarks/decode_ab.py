"""The decode delta kernel of this tree against an earlier version of it, in one run: the same slot
pool (64 random accounts over tkllm-s's linears, 0.3%), each kind of decode launch over all 24
layers (as `decode_kernels.py` times them, inside CUDA graphs), per tile config, the two versions
taking turns `--reps` times (medians). Also checks that both give the same sums.

    git show REV:tkllm_ray/sparse/segmented_triton.py > /tmp/old_kernels.py
    python benchmarks/decode_ab.py --old /tmp/old_kernels.py --label REV   # GPU; writes decode-ab-<device>.json

The earlier file is loaded as its own module; it runs through this tree's launch code (the slot
pool, groups, tiles), so its `_csr_decode` must take the same arguments, less switches added since
(left at their off value). Kernels up to ba4d7a9 read a group's layout from a `meta` tensor, not
as constants: they take other arguments and cannot be compared here. One without PACKED reads a
pool of the same accounts with columns and values apart, as it was then (`SlotDeltas(pack=False)`).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import sys

import torch
from decode_kernels import (DEV, LAYERS, STEP_KINDS, _launcher, _pool, _prefixes, _step_ms,  # sibling script
                            _taking_turns)
from results_io import sync, write_result

TILES = [{"LINES": ln, "BLOCK_E": 256, "num_warps": w, "PREFETCH": True} for ln, w in itertools.product((128, 256), (2, 4))]


def _load_old(path: str):
    """The earlier kernel file as a module (its torch op renamed: this tree registers the name)."""
    src = open(path).read().replace('"tkllm::decode_add"', '"tkllm::decode_add_ab_old"')
    spec = importlib.util.spec_from_loader("old_segmented_triton", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__file__ = os.path.abspath(path)  # triton reads a jitted function's source through its file
    sys.modules[spec.name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


class _Earlier:
    """An earlier jitted kernel as this tree's launch code calls it: keyword switches it does not
    take are dropped while they are off (on, the comparison would not be like for like: refused)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def takes(self, name: str) -> bool:
        return name in self.kernel.arg_names

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            new = {k: v for k, v in kw.items()
                   if k not in self.kernel.arg_names and k not in ("num_warps", "num_stages")}
            if any(new.values()):
                raise ValueError(f"the earlier kernel has no {sorted(k for k, v in new.items() if v)}")
            return launch(*args, **{k: v for k, v in kw.items() if k not in new})
        return run


def _as_version(launch, kernel):
    """`launch` with this tree's decode kernel swapped for `kernel` while it runs (None: as is)."""
    from tkllm_ray.sparse import segmented_triton as K

    def run():
        saved = K._csr_decode
        K._csr_decode = kernel or saved
        try:
            launch()
        finally:
            K._csr_decode = saved
    return run


def compare(old_kernel, users: int = 64, density: float = 0.003, layers: int = LAYERS, reps: int = 5,
            tiles: list = TILES) -> dict:
    from tkllm_ray.sparse import segmented_triton as K

    table, _, total = _pool(users, density, layers)
    dtype = table.dtype
    old = _Earlier(old_kernel)
    # an earlier kernel without packed entries reads the same accounts laid out as it was then
    tables = {"old": table if old.takes("PACKED") else _pool(users, density, layers, pack=False)[0], "new": table}
    out: dict = {"users": users, "density": density, "layers": layers, "entries": total, "reps": reps,
                 "packed": {v: t.packed for v, t in tables.items()}, "kinds": {}}
    versions = {"old": old, "new": None}
    for kind, (members, din) in STEP_KINDS.items():
        width = sum(o for _, o in members)
        key = f"{width}x{din}"
        x = torch.randn(users, din, device=DEV, dtype=dtype)
        prefixes = _prefixes(kind, layers)
        rows = []
        for cfg in tiles:
            K.CONFIG["decode_by_shape"][key] = cfg  # read when a launch runs (a group's when it is added)
            sums = {v: torch.zeros(users, width, device=DEV, dtype=torch.float32) for v in versions}
            for v, kernel in versions.items():
                _as_version(_launcher(tables[v], members, width, prefixes, x, sums[v]), kernel)()
            sync()
            diff = float((sums["new"] - sums["old"]).abs().max() / sums["old"].abs().max().clamp_min(1e-6))
            y = torch.zeros(users, width, device=DEV, dtype=dtype)  # timed into the data's dtype, as served
            times = _taking_turns({v: _as_version(_launcher(tables[v], members, width, prefixes, x, y), kernel)
                                   for v, kernel in versions.items()}, len(prefixes), reps)
            row = {**cfg, **{f"{v}_ms": statistics.median(t) for v, t in times.items()}, "runs": times,
                   "max_relative_difference": diff}
            rows.append(row)
            print(f"{kind} {cfg}: old {row['old_ms'] * 1e3:.2f} us, new {row['new_ms'] * 1e3:.2f} us "
                  f"(sums agree to {diff:.1e})", flush=True)
        best = {v: min(rows, key=lambda r: r[f"{v}_ms"]) for v in versions}
        out["kinds"][kind] = {"tiles": rows, **{f"best_{v}_ms": b[f"{v}_ms"] for v, b in best.items()},
                              **{f"best_{v}_tiles": {c: b[c] for c in tiles[0]} for v, b in best.items()}}
    for v in versions:
        out[f"model_ms_per_step_{v}_best_tiles"] = _step_ms({k: r[f"best_{v}_ms"] for k, r in out["kinds"].items()},
                                                           layers)
    out["ratio_new_vs_old"] = out["model_ms_per_step_new_best_tiles"] / out["model_ms_per_step_old_best_tiles"]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="an earlier tkllm_ray/sparse/segmented_triton.py")
    ap.add_argument("--label", default="", help="what the earlier file is (e.g. its git revision), kept in the JSON")
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    device = torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"
    res = {**compare(_load_old(args.old)._csr_decode, args.users, args.density, reps=args.reps), "old": args.label,
           "device": device}
    print(f"per step, each version's best tiles per kind: old {res['model_ms_per_step_old_best_tiles']:.3f} ms, "
          f"new {res['model_ms_per_step_new_best_tiles']:.3f} ms ({res['ratio_new_vs_old']:.2f}x)")
    write_result(args.out, "decode-ab", device, res)
    return res


if __name__ == "__main__":
    main()
