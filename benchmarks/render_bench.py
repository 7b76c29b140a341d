"""Context-image rendering throughput: images/s per CPU core, per OCC mode.

Two measurements in one run, same plans: (1) the renderer alone in this process (1 core),
(2) the Ray Data map_batches stage with an actor pool of N actors (what ingest runs), so the
per-core rate of the real stage is images/s / N. Writes benchmarks/results/render-cpu.json.

    python benchmarks/render_bench.py [--accounts 6] [--actors 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

from tkllm_ray.data.fonts import FontChain
from tkllm_ray.data.pyramid import plan_account
from tkllm_ray.data.render import png_bytes, render_text
from tkllm_ray.data.synth import generate_records


def make_plans(n_accounts: int, modes: list[str]):
    from tkllm_ray.data.validate import RowRules, record_to_row

    by_acc: dict[str, list] = {}
    for i, rec in enumerate(generate_records(n_accounts, 160, seed=7)):
        row = record_to_row(rec, "synth", i, RowRules())
        by_acc.setdefault(row["account_id"], []).append(row)
    plans = []
    for acc, rows in by_acc.items():
        rows.sort(key=lambda r: r["created_at"], reverse=True)
        plans += plan_account(acc, rows, modes, first_bucket_posts=8, num_buckets=3, summary=True)
    return plans


def bench_inline(plans) -> dict:
    chain = FontChain()
    out = {}
    for mode in sorted({p.mode for p in plans}):
        ps = [p for p in plans if p.mode == mode]
        t0 = time.perf_counter()
        for p in ps:
            png_bytes(render_text(chain, p.text, p.canvas_px, p.side_px).image)
        dt = time.perf_counter() - t0
        out[mode] = {"images": len(ps), "seconds": round(dt, 3), "images_per_s_per_core": round(len(ps) / dt, 2)}
    return out


def bench_ray(plans, actors: int) -> dict:
    import logging

    import pyarrow as pa
    import pyarrow.compute  # noqa: F401
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from tkllm_ray.data.stages import PLAN_SCHEMA, RenderImages

    ray.init(num_cpus=actors, include_dashboard=False, logging_level=logging.WARNING)
    DataContext.get_current().enable_progress_bars = False
    table = pa.Table.from_pylist([p.__dict__ for p in plans], schema=PLAN_SCHEMA)
    with tempfile.TemporaryDirectory() as d:
        # Materialise the repartition first: a shuffle still running when the actor pool has
        # taken every CPU would wait forever (the same reason ingest materialises its plans).
        def run(ds):
            t0 = time.perf_counter()
            n = ds.map_batches(RenderImages, batch_size=2, batch_format="pyarrow",
                               compute=ActorPoolStrategy(size=actors),
                               fn_constructor_kwargs={"images_uri": d, "tokenizer": "builtin", "fonts": None,
                                                      "storage": None}).count()
            return n, time.perf_counter() - t0

        # Start-up alone (actors load the tokenizer and fonts): one image per actor.
        tiny = table.filter(pa.compute.equal(table["mode"], "tiny")).slice(0, actors)
        _, startup = run(ray.data.from_arrow(tiny).repartition(actors).materialize())
        n, dt = run(ray.data.from_arrow(table).repartition(actors * 4).materialize())
    ray.shutdown()
    steady = n / max(dt - startup, 1e-9)
    return {"actors": actors, "images": n, "seconds": round(dt, 2), "startup_s": round(startup, 2),
            "images_per_s_with_startup": round(n / dt, 2), "images_per_s": round(steady, 2),
            "images_per_s_per_core": round(steady / actors, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--accounts", type=int, default=12)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "render-cpu.json"))
    a = ap.parse_args()
    modes = ["tiny", "base", "hifi"]
    plans = make_plans(a.accounts, modes)
    inline = bench_inline(plans)
    pool = bench_ray(plans, a.actors)
    import PIL
    import ray

    result = {
        "benchmark": "context-image rendering", "command": " ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv),
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"python": platform.python_version(), "pillow": PIL.__version__, "ray": ray.__version__},
        "images_per_account": len(plans) // a.accounts, "inline_by_mode": inline, "ray_actor_pool": pool,
        "images_per_s_per_core": pool["images_per_s_per_core"],
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'mode':<6} {'images':>6} {'img/s/core':>10}")
    for mode, m in inline.items():
        print(f"{mode:<6} {m['images']:>6} {m['images_per_s_per_core']:>10}")
    print(f"Ray Data actor pool ({pool['actors']} actors): {pool['images_per_s']} img/s = "
          f"{pool['images_per_s_per_core']} img/s/core after {pool['startup_s']} s of actor start-up")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
