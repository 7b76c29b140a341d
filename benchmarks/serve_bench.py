"""Serving throughput and latency (issue 5's benchmark), side by side in one run on one device:
our engine on the base alone, on 64 requests of 64 distinct accounts, on 64 requests of one
account; `transformers` generate on the base; `peft` serving 64 LoRA adapters in one mixed batch
(`adapter_names=`); per-request merge/restore of deltas. Then cold delta loads (store -> device)
and time to first token when the working set is 4x the device cache vs when it all fits
(serve_latency.py).

    python benchmarks/serve_bench.py                     # GPU: tkllm-s bf16
    python benchmarks/serve_bench.py --model tkllm-tiny --accounts 16 --batch 8 --new-tokens 8   # CPU smoke

Deltas: `--accounts` random 0.3% deltas (bf16 values) published to a local store. Writes
serving-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import tempfile
import time

import torch

from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.serve.delta_cache import DeltaCache
from tkllm_ray.serve.engine import DeltaBatchEngine, GenRequest
from tkllm_ray.sparse.mixed import swap_out
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.sensitivity import target_linears
# sibling modules: this script's folder is on sys.path
from results_io import sync, write_result
from serve_common import CUDA, DEV, DTYPE, publish_random, requests
from serve_latency import cache_latency


def _greedy(args) -> dict:
    """transformers generate: exactly --new-tokens greedy tokens (the baselines decode as many as ours)."""
    return dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)


def _timed_once(engine: DeltaBatchEngine, reqs: list[GenRequest], before=None) -> dict:
    """One end-to-end run (admission, prefill, every decode step) and its median decode step (each
    step ends in a host copy of the picked tokens, so its wall time is the device's)."""
    # Warm-up: two of the requests (kernels compiled, decode graphs captured, a single account
    # merged in), the full batch's prefill as the run has it (its graph captured: first-call set-up
    # for a shape is not the engine's cost), then on the base (which empties the slots, so every
    # run places its deltas again: from the pool's kept layouts unless `before` drops them).
    engine.generate(reqs[:2])
    engine.generate([GenRequest(r.prompt, r.delta, 2) for r in reqs])
    engine.generate([GenRequest(r.prompt, None, 2) for r in reqs])
    if before is not None:
        before()
    sync()
    captures = engine.stats["graph_captures"]
    t = time.perf_counter()
    out, steps = [[] for _ in reqs], []
    for updates in engine.stream(reqs):
        steps.append(time.perf_counter())
        for i, tokens, _ in updates:
            out[i] = tokens
    sync()
    wall = time.perf_counter() - t
    gaps = [b - a for a, b in zip(steps[1:], steps[2:])]  # the decode steps after the admitting step
    step_s = statistics.median(gaps)
    return {"tokens_per_s": sum(len(o) for o in out) / wall, "wall_s": wall, "batch": len(reqs),
            "decode_step_ms_median": 1e3 * step_s, "decode_tokens_per_s": len(reqs) / step_s,
            # where the wall time goes: the admitting step (admission, prefill, the first decode step),
            # then the other steps' sum and slowest (a median hides a few slow steps)
            "first_step_ms": 1e3 * (steps[0] - t), "other_steps_ms": 1e3 * (steps[-1] - steps[0]),
            "slowest_step_ms": 1e3 * max(gaps + [steps[1] - steps[0]]),
            "graph_captures": engine.stats["graph_captures"] - captures}


def timed_together(runs: dict[str, tuple], reps: int = 5) -> dict:
    """Each (engine, requests[, what to do just before timing]) of `runs` end to end, `reps` times,
    taking turns: run r of every one comes before run r + 1 of any, so a drift of the device's
    clocks over the section reaches all of them alike (their ratios are the point). Per run: the
    median of its `reps` by tokens/s (one run of 64 requests lasts a few tenths of a second:
    single runs vary by 20%)."""
    got: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            got[name].append(_timed_once(*run))
    out = {}
    for name, rs in got.items():
        median = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        out[name] = {**median, "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
                     "decode_step_ms_runs": [r["decode_step_ms_median"] for r in rs]}
    return out


def timed_generate(engine: DeltaBatchEngine, reqs: list[GenRequest], reps: int = 5) -> dict:
    """`timed_together` of one engine and request list."""
    return timed_together({"run": (engine, reqs)}, reps)["run"]


def profile_decode(engine: DeltaBatchEngine, reqs: list[GenRequest], out_dir: str, steps: int = 10) -> dict:
    """Diagnostics (--profile): device time per kernel over `steps` decode steps of a full batch."""
    from torch.profiler import ProfilerActivity, profile

    for r in reqs:
        engine.submit(r)
    for _ in range(3):  # admit, then replay-ready decode steps
        engine.step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "serve-decode-profile.txt"), "w") as f:
        f.write(table)
    print(table, flush=True)
    engine.abort()
    return {"steps": steps}


def profile_prefill(engine: DeltaBatchEngine, reqs: list[GenRequest], out_dir: str) -> dict:
    """Diagnostics (--profile): one mixed admission and prefill of the full batch (one new token
    each; the layouts kept from a warm-up), by device time and by host time per op."""
    from torch.profiler import ProfilerActivity, profile

    def admit():
        engine.generate([GenRequest(r.prompt, r.delta, 1) for r in reqs])

    admit()  # kernels compiled, layouts kept
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        admit()
        sync()
        wall = time.perf_counter() - t
    tables = [prof.key_averages().table(sort_by=key, row_limit=25) for key in ("cuda_time_total", "cpu_time_total")]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "serve-prefill-profile.txt"), "w") as f:
        f.write("\n\n".join(tables))
    print(tables[0], flush=True)
    return {"wall_ms_profiled": 1e3 * wall}


def admission(engine: DeltaBatchEngine, args, deltas: list) -> dict:
    """Diagnostics: where a full batch's admission goes (device-synced phases): laying out and
    copying 64 accounts' deltas into slots (anew, then from the kept layouts), then the prefill
    forward with and without deltas, eagerly and as the engine runs it (its bucket's CUDA graph)."""
    out, table = {}, engine._table
    ids_host = torch.randint(3, args.vocab, (len(deltas), args.prompt), generator=torch.Generator().manual_seed(2))
    lens_host = torch.full((len(deltas),), args.prompt)
    ids, lens, slots = ids_host.to(DEV), lens_host.to(DEV), torch.arange(len(deltas), device=DEV)

    def forward(ctx):
        engine.ctx = ctx
        try:
            return engine._prefill(ids, slots, lens)
        finally:
            engine.ctx = None

    for _ in range(3):  # the last repetition counts (the first ones compile and allocate)
        if table is not None:
            for key, clear in (("layout_and_copy_ms", True), ("copy_kept_layouts_ms", False)):
                table.assign([None] * table.slots)
                if clear:  # laid out anew, as accounts not served lately
                    table.clear_layouts()
                sync()
                t = time.perf_counter()
                ctx, _ = table.prefill(list(range(len(deltas))), deltas)
                sync()
                out[key] = 1e3 * (time.perf_counter() - t)
            t = time.perf_counter()
            forward(ctx)
            sync()
            out["prefill_deltas_ms"] = 1e3 * (time.perf_counter() - t)
            t = time.perf_counter()
            engine._prefill_logits(ids_host, list(range(len(deltas))), lens_host, ctx, "deltas")
            sync()
            out["prefill_deltas_graph_ms"] = 1e3 * (time.perf_counter() - t)
        t = time.perf_counter()
        forward(engine._no_deltas)
        sync()
        out["prefill_base_ms"] = 1e3 * (time.perf_counter() - t)
        t = time.perf_counter()
        engine._prefill_logits(ids_host, list(range(len(deltas))), lens_host, engine._no_deltas, "base")
        sync()
        out["prefill_base_graph_ms"] = 1e3 * (time.perf_counter() - t)
    return out


def unmerged(engine: DeltaBatchEngine, run):
    """`run` with one account's batches kept on the segmented path (not merged into the weights)."""
    engine.merge_single = False
    try:
        return run()
    finally:
        engine.merge_single = True


def churn(engine: DeltaBatchEngine, args, deltas: list) -> dict:
    """Continuous batching with requests joining and leaving: 4 x batch requests of a quarter to
    all of --new-tokens new tokens, each with its own account's delta, through batch slots."""
    g = torch.Generator().manual_seed(1)
    reqs = [GenRequest(torch.randint(3, args.vocab, (args.prompt,), generator=g).tolist(), deltas[i % len(deltas)],
                       int(torch.randint(max(1, args.new_tokens // 4), args.new_tokens + 1, (1,), generator=g))) for i in range(4 * args.batch)]
    sync()
    captures = engine.stats["graph_captures"]
    t = time.perf_counter()
    tokens = sum(len(o) for o in engine.generate(reqs))
    sync()
    wall = time.perf_counter() - t
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "requests": len(reqs),
            "graph_captures": engine.stats["graph_captures"] - captures}


def hf_generate(model, args) -> dict:
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(DEV)
    kw = _greedy(args)
    model.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), **kw)
    sync()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    sync()
    return {"tokens_per_s": args.batch * args.new_tokens / (time.perf_counter() - t)}


def peft_mixed(model, args) -> dict:
    """peft LoRA r16 on all linears, one adapter per request, one mixed batch (adapter_names=)."""
    from peft import LoraConfig, get_peft_model

    # a fresh base (same seed, same weights): the engines swapped the shared one's linears for theirs
    model = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=next(model.parameters()).dtype, device=DEV)
    m = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False),
                       adapter_name="a0")
    for i in range(1, args.batch):
        m.add_adapter(f"a{i}", LoraConfig(r=16, target_modules="all-linear", init_lora_weights=False))
    m = m.to(next(model.parameters()).dtype).eval()
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).to(DEV)
    names = [f"a{i}" for i in range(args.batch)]
    kw = _greedy(args)
    m.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), adapter_names=names[:2], **kw)
    sync()
    t = time.perf_counter()
    m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kw)
    sync()
    return {"tokens_per_s": args.batch * args.new_tokens / (time.perf_counter() - t)}


def merge_restore(model, args, deltas: list) -> dict:
    """One request at a time: scatter its delta (as the serving cache holds it) into the weights,
    generate, restore exactly. Then the scatter and the restore alone, as the engine merges a
    one-account batch (one launch each way on a GPU) and module by module (the torch path),
    taking turns."""
    reqs = requests(args, [None] * len(deltas))
    kw = _greedy(args)
    sync()
    t, scatter = time.perf_counter(), []
    for r, d in zip(reqs, deltas):
        s = time.perf_counter()
        applied = AppliedDelta(model, d)
        sync()
        scatter.append(time.perf_counter() - s)
        ids = torch.tensor([r.prompt], device=DEV)
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        applied.restore()
    sync()
    wall = time.perf_counter() - t
    out = {"tokens_per_s": len(reqs) * args.new_tokens / wall, "scatter_ms_p50": 1e3 * statistics.median(scatter)}
    times: dict[str, list[float]] = {}
    for _ in range(3):
        for fused in (True, False):
            for d in deltas:
                s = time.perf_counter()
                applied = AppliedDelta(model, d, fused=fused)
                sync()
                m = time.perf_counter()
                applied.restore()
                sync()
                times.setdefault(f"merge_{'fused' if fused else 'per_module'}_ms", []).append(1e3 * (m - s))
                times.setdefault(f"restore_{'fused' if fused else 'per_module'}_ms", []).append(
                    1e3 * (time.perf_counter() - m))
    return {**out, **{f"{k}_p50": statistics.median(v) for k, v in times.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tkllm-s")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--accounts", type=int, default=128, help="deltas published to the store (the TTFT test: a "
                    "device cache of a quarter of them, a working set of all)")
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--cold-loads", type=int, default=32)
    ap.add_argument("--ttft-requests", type=int, default=100)
    ap.add_argument("--format-accounts", type=int, default=32, help="latency: cold loads of this many deltas "
                    "stored in format 2 and in format 3, taking turns (0: none)")
    ap.add_argument("--skip", nargs="*", default=[], help="sections not to run (e.g. peft_mixed merge_restore)")
    ap.add_argument("--profile", action="store_true", help="diagnostics: profile 10 mixed decode steps "
                    "and time an admission's phases")
    ap.add_argument("--tune", action="store_true", help="first sweep the decode kernel's tiles (decode_kernels.py, "
                    "its own JSON), then serve with the fastest")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if args.tune and CUDA:
        import decode_kernels  # the sibling script (this script's folder is on sys.path)

        decode_kernels.main(["--users", str(args.batch), "--density", str(args.density), "--out", args.out])
    base = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=DTYPE, device=DEV).eval()
    fp = fingerprint(base)
    shapes = {n: m.weight.numel() for n, m in target_linears(base).items()}
    res: dict = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu", "config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "deltas")
        t = time.perf_counter()
        accounts = [f"acct{a:05d}" for a in range(args.accounts)]
        publish_random(store, accounts, shapes, args.density, args.model, fp)
        res["publish_s"] = time.perf_counter() - t
        print(f"published {args.accounts} deltas in {res['publish_s']:.1f} s", flush=True)
        cache = DeltaCache(store, DEV, device_budget=1 << 40, host_budget=1, base_fingerprint=fp, dtype=DTYPE)
        deltas = [cache.get(a).delta for a in accounts[: args.batch]]
        nbytes = cache.get(accounts[0]).nbytes
        res["delta_mb"] = nbytes / 2**20
        cache.close()
        # The same engine with CUDA graphs off, on its own copy of the base (an engine swaps the
        # base's linears for its own).
        eager = DeltaBatchEngine(copy.deepcopy(base), slots=args.batch, max_len=args.prompt + args.new_tokens,
                                 cuda_graphs=False)
        spare = copy.deepcopy(base)  # copied before `engine` swaps the base's linears for its own
        # The engine as it was before stacking q/k/v and gate/up (one GEMM and delta launch per linear)
        separate = DeltaBatchEngine(copy.deepcopy(base), slots=args.batch, max_len=args.prompt + args.new_tokens,
                                    stack=False)
        engine = DeltaBatchEngine(base, slots=args.batch, max_len=args.prompt + args.new_tokens)
        gc.freeze()  # as a replica does once its base and engine are built (serve/app.py)
        made: list = []

        def compiled() -> DeltaBatchEngine:  # the engine with torch.compile on its base step, made once
            if not made:
                made.append(DeltaBatchEngine(spare, slots=args.batch, max_len=args.prompt + args.new_tokens,
                                             compile=True, freeze_gc=True))  # as a replica's engine
            return made[0]
        # Our engine first, the slow baselines last; the JSON is rewritten after every section so a
        # run cut short by its time limit still reports what it measured.
        # "decode": the runs the headline ratios compare, taking turns (timed_together)
        sections = [("decode", lambda: timed_together({
                        "ours_base": (engine, requests(args, [None] * args.batch)),
                        "ours_mixed": (engine, requests(args, deltas)),  # their layouts kept from earlier runs
                        # the same accounts laid out anew in every run (as accounts not served lately)
                        "ours_mixed_new_layouts": (engine, requests(args, deltas), engine._table and
                                                   engine._table.clear_layouts),
                        "ours_single_account": (engine, requests(args, [deltas[0]] * args.batch)),
                        "ours_base_separate": (separate, requests(args, [None] * args.batch)),
                        "ours_mixed_separate": (separate, requests(args, deltas))})),
                    ("admission", lambda: admission(engine, args, deltas)),
                    ("ours_single_account_segmented", lambda: unmerged(
                        engine, lambda: timed_generate(engine, requests(args, [deltas[0]] * args.batch)))),
                    ("ours_mixed_churn", lambda: churn(engine, args, deltas)),
                    # the compiled engine's rows, taking turns as the decode section's do
                    ("decode_compiled", lambda: timed_together({
                        "ours_base_compiled": (compiled(), requests(args, [None] * args.batch)),
                        "ours_mixed_compiled": (compiled(), requests(args, deltas)),
                        "ours_single_account_compiled": (compiled(), requests(args, [deltas[0]] * args.batch))})),
                    ("ours_base_eager", lambda: timed_generate(eager, requests(args, [None] * args.batch))),
                    ("ours_mixed_eager", lambda: timed_generate(eager, requests(args, deltas))),
                    ("hf_generate_base", lambda: hf_generate(base, args)),
                    ("merge_restore", lambda: merge_restore(base, args, deltas[: min(16, len(deltas))])),
                    ("latency", lambda: cache_latency(args, engine, store, fp, accounts, nbytes, shapes)),
                    ("peft_mixed", lambda: peft_mixed(base, args)),
                    ("profile", lambda: profile_decode(engine, requests(args, deltas), args.out)),
                    ("profile_prefill", lambda: profile_prefill(engine, requests(args, deltas), args.out))]
        for name, run in sections:
            if name in args.skip or (name in ("profile", "profile_prefill", "admission") and not args.profile):
                continue
            t = time.perf_counter()
            got = run()
            for key, r in (got.items() if name in ("decode", "decode_compiled") else [(name, got)]):
                res[key] = {**r, "section_s": time.perf_counter() - t}
                print(f"{key}: {json.dumps(res[key])}", flush=True)
            write_result(args.out, "serving", res["device"], res)
        swap_out(base)
    try:
        from tkllm_ray.sparse.segmented_triton import CONFIG

        res["kernel_tiles"] = CONFIG
    except ImportError:  # no triton: the CPU reference served
        pass
    base_tps = res.get("ours_base", {}).get("tokens_per_s")
    if base_tps:
        res["base_decode_tokens_per_s_b64"] = base_tps
        # end to end (admission, prefill and decode), then over decode steps alone (their medians)
        for key, step_key, section in (
                ("mixed64_throughput_ratio_vs_base", "mixed64_decode_step_ratio_vs_base", "ours_mixed"),
                ("single_account_throughput_ratio_vs_base", "single_account_decode_step_ratio_vs_base",
                 "ours_single_account"),
                ("single_account_segmented_ratio_vs_base", None, "ours_single_account_segmented"),
                ("mixed64_new_layouts_ratio_vs_base", None, "ours_mixed_new_layouts")):
            if section in res:
                res[key] = res[section]["tokens_per_s"] / base_tps
                if step_key:
                    res[step_key] = res["ours_base"]["decode_step_ms_median"] / res[section]["decode_step_ms_median"]
        # stacked q/k/v and gate/up vs one GEMM and delta launch per linear (the same run)
        for key, new, old in (("stacked_vs_separate_base", "ours_base", "ours_base_separate"),
                              ("stacked_vs_separate_mixed", "ours_mixed", "ours_mixed_separate")):
            if new in res and old in res:
                res[key] = res[new]["tokens_per_s"] / res[old]["tokens_per_s"]
    for key, section in (("mixed64_compiled_ratio_vs_compiled_base", "ours_mixed_compiled"),
                         ("single_account_compiled_ratio_vs_compiled_base", "ours_single_account_compiled")):
        if section in res and "ours_base_compiled" in res:
            base_c, row = res["ours_base_compiled"], res[section]
            res[key] = row["tokens_per_s"] / base_c["tokens_per_s"]
            step_key = key.replace("_ratio_", "_decode_step_ratio_")
            res[step_key] = base_c["decode_step_ms_median"] / row["decode_step_ms_median"]
            # run r of each took its turn beside run r of the others: the ratio run by run
            res[step_key + "_per_run"] = [b / m for b, m in zip(base_c["decode_step_ms_runs"],
                                                                 row["decode_step_ms_runs"])]
    if "latency" in res:
        res.update({k: res["latency"][k] for k in ("cold_load_p50_ms", "cold_load_p99_ms",
                                                    "ttft_p99_ratio_4x_working_set",  # host tier prefetched
                                                    "ttft_p99_ratio_4x_working_set_from_store")})
    if "peft_mixed" in res:
        res["mixed64_speedup_vs_peft"] = res["ours_mixed"]["tokens_per_s"] / res["peft_mixed"]["tokens_per_s"]
    write_result(args.out, "serving", res["device"], res)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    return res


if __name__ == "__main__":
    main()
