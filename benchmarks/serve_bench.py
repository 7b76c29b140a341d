"""Serving throughput and latency (issue 5's benchmark), side by side in one run on one device:
our engine on the base alone, on 64 requests of 64 distinct accounts, on 64 requests of one
account; `transformers` generate on the base; `peft` serving 64 LoRA adapters in one mixed batch
(`adapter_names=`); per-request merge/restore of deltas. Then cold delta loads (store -> device)
and time to first token when the working set is 4x the device cache vs when it all fits.

    python benchmarks/serve_bench.py                     # GPU: tkllm-s bf16
    python benchmarks/serve_bench.py --model tkllm-tiny --accounts 16 --batch 8 --new-tokens 8   # CPU smoke

Deltas: `--accounts` random 0.3% deltas (bf16 values) published to a local store. Writes
serving-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.serve.delta_cache import DeltaCache, _Encoded
from tkllm_ray.serve.engine import DeltaBatchEngine, GenRequest
from tkllm_ray.sparse.delta_store import save_delta
from tkllm_ray.sparse.mixed import swap_out
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.storage import read_latest
from results_io import sync, write_result  # sibling module: this script's folder is on sys.path

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def random_delta(shapes: dict, density: float, seed: int) -> dict:
    """Sorted unique random entries per module (a few duplicates drawn are dropped)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, numel in shapes.items():
        idx = torch.unique(torch.randint(0, numel, (max(1, round(density * numel)),), generator=g))
        out[name] = (idx, (torch.randn(idx.numel(), generator=g) * 1e-2).to(torch.bfloat16))
    return out


def _requests(args, deltas: list, seed: int = 0) -> list[GenRequest]:
    g = torch.Generator().manual_seed(seed)
    return [GenRequest(torch.randint(3, args.vocab, (args.prompt,), generator=g).tolist(), d, args.new_tokens)
            for d in deltas]


def _greedy(args) -> dict:
    """transformers generate: exactly --new-tokens greedy tokens (the baselines decode as many as ours)."""
    return dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)


def _timed_once(engine: DeltaBatchEngine, reqs: list[GenRequest], before=None) -> dict:
    """One end-to-end run (admission, prefill, every decode step) and its median decode step (each
    step ends in a host copy of the picked tokens, so its wall time is the device's)."""
    # Warm-up: the full batch's prefill shape on the base (first-call GEMM/attention set-up for a
    # new shape is not the engine's cost; it also empties the slots, so every run places its
    # deltas again: from the pool's kept layouts unless `before` drops them), then two of the
    # requests (kernels compiled, decode graphs captured, a single account merged in).
    engine.generate([GenRequest(r.prompt, None, 2) for r in reqs])
    engine.generate(reqs[:2])
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
    step_s = statistics.median(b - a for a, b in zip(steps[1:], steps[2:]))  # after the admitting step
    return {"tokens_per_s": sum(len(o) for o in out) / wall, "wall_s": wall, "batch": len(reqs),
            "decode_step_ms_median": 1e3 * step_s, "decode_tokens_per_s": len(reqs) / step_s,
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


def admission(engine: DeltaBatchEngine, args, deltas: list) -> dict:
    """Diagnostics: where a full batch's admission goes (device-synced phases): laying out and
    copying 64 accounts' deltas into slots (anew, then from the kept layouts), then the prefill
    forward with and without deltas."""
    out, table = {}, engine._table
    ids = torch.randint(3, args.vocab, (len(deltas), args.prompt), generator=torch.Generator().manual_seed(2)).to(DEV)
    slots = torch.arange(len(deltas), device=DEV)
    lens = torch.full((len(deltas),), args.prompt, device=DEV)

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
        forward(engine._no_deltas)
        sync()
        out["prefill_base_ms"] = 1e3 * (time.perf_counter() - t)
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
    """One request at a time: scatter its delta into the weights, generate, restore exactly."""
    reqs = _requests(args, [None] * len(deltas))
    kw = _greedy(args)
    sync()
    t, scatter = time.perf_counter(), []
    for r, d in zip(reqs, deltas):
        s = time.perf_counter()
        applied = AppliedDelta(model, {n: (i.to(DEV), v.to(DEV)) for n, (i, v) in d.items()})
        sync()
        scatter.append(time.perf_counter() - s)
        ids = torch.tensor([r.prompt], device=DEV)
        model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        applied.restore()
    sync()
    wall = time.perf_counter() - t
    return {"tokens_per_s": len(reqs) * args.new_tokens / wall, "scatter_ms_p50": 1e3 * statistics.median(scatter)}


def _drop_page_cache() -> bool:
    """Flush the store's fresh writes (else the cold loads below read beside their writeback), then
    drop the page cache where this process may (root on Linux), so a cold load reads the disk.
    Returns whether the cache was dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _cold_phases(store: str, fp: str, accounts: list[str]) -> dict:
    """Diagnostics: where a cold load's time goes, phase by phase (device-synced), over accounts
    whose files the cache has not read: manifest (LATEST and manifest.json), the file read with
    its hash, decoding the views, the copy to the device, the entries check there."""
    from tkllm_ray.sparse.delta_store import decode, read_version
    from tkllm_ray.storage import join, read_hashed

    probe = DeltaCache(store, DEV, device_budget=1 << 40, host_budget=1, base_fingerprint=fp,
                       dtype=torch.bfloat16 if CUDA else torch.float32)
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        phases.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
        return out

    dtype = torch.bfloat16 if CUDA else torch.float32
    for a in accounts:
        version, manifest = timed("manifest", lambda: read_version(store, a))
        blob, _ = timed("read_and_hash", lambda: read_hashed(join(store, a, version, "delta.safetensors")))
        enc = timed("decode", lambda: decode(blob, None, expand=False))
        # format 3: copied as stored and expanded there (int64 until checked), as the cache does
        hot = timed("to_device_and_expand", lambda: _Encoded(a, version, manifest, enc).expand(DEV, dtype))
        timed("check", lambda: probe._check_entries(hot))
    probe.close()
    return {k: _pct(v, 0.5) for k, v in phases.items()}


def _by_format(args, shapes: dict, fp: str, root: str) -> dict:
    """Cold loads of the same deltas stored in format 2 (int32 indices) and format 3 (16-bit gaps),
    from the disk, the two taking turns account by account, each through its own cache."""
    accounts = [f"fmt{a:04d}" for a in range(args.format_accounts)]
    stores = {v: os.path.join(root, f"format{v}") for v in (2, 3)}
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda av: save_delta(stores[av[1]], accounts[av[0]], random_delta(shapes, args.density, av[0]),
                                            args.model, fp, "gspf", args.density, format_version=av[1]),
                      [(a, v) for a in range(len(accounts)) for v in stores]))
    out = {"page_cache_dropped": _drop_page_cache()}
    caches = {v: DeltaCache(st, DEV, device_budget=1 << 40, host_budget=1, base_fingerprint=fp,
                            dtype=torch.bfloat16 if CUDA else torch.float32) for v, st in stores.items()}
    loads: dict[int, list[float]] = {v: [] for v in stores}
    for a in accounts:
        for v, cache in caches.items():
            t = time.perf_counter()
            cache.get(a)
            loads[v].append((time.perf_counter() - t) * 1e3)
    for v, cache in caches.items():
        out[f"format{v}_file_mb"] = os.path.getsize(os.path.join(
            stores[v], accounts[0], read_latest(os.path.join(stores[v], accounts[0])), "delta.safetensors")) / 2**20
        out[f"format{v}_cold_load_p50_ms"], out[f"format{v}_cold_load_p99_ms"] = _pct(loads[v], 0.5), _pct(loads[v], 0.99)
        cache.close()
    out["p50_ratio_format3_vs_2"] = out["format3_cold_load_p50_ms"] / out["format2_cold_load_p50_ms"]
    return out


def cache_latency(args, engine: DeltaBatchEngine, store: str, fp: str, accounts: list[str], nbytes: int,
                  shapes: dict) -> dict:
    """Cold loads (from the disk where the page cache can be dropped), then TTFT (cache lookup +
    prefill + first token) over a random request stream whose working set fits the device cache
    vs one 4x larger."""
    out = {"page_cache_dropped": _drop_page_cache()}
    cold = DeltaCache(store, DEV, device_budget=nbytes * len(accounts) * 2, host_budget=1, base_fingerprint=fp,
                      dtype=torch.bfloat16 if CUDA else torch.float32)
    loads = []
    for a in accounts[: args.cold_loads]:
        t = time.perf_counter()
        cold_delta = cold.get(a).delta
        loads.append((time.perf_counter() - t) * 1e3)
    out["cold_load_p50_ms"], out["cold_load_p99_ms"] = _pct(loads, 0.5), _pct(loads, 0.99)
    cold.close()
    out["cold_load_phases_p50_ms"] = _cold_phases(store, fp, accounts[args.cold_loads: 2 * args.cold_loads])
    if args.format_accounts:
        out["cold_load_by_format"] = _by_format(args, shapes, fp, os.path.dirname(store))
    cached = max(2, len(accounts) // 4)
    g = torch.Generator().manual_seed(1)
    warm = _requests(args, [None])[0]
    warm.max_tokens = 1
    warm.delta = cold_delta
    engine.generate([warm])  # first-use kernel compiles for the prefill shape: not part of any TTFT
    for name, working_set in (("all_hit", cached), ("4x_working_set", 4 * cached)):
        cache = DeltaCache(store, DEV, device_budget=nbytes * cached + nbytes // 2, host_budget=1,
                           base_fingerprint=fp, dtype=torch.bfloat16 if CUDA else torch.float32)
        for a in accounts[:cached]:
            cache.get(a)  # warm: the all-hit stream never misses
        ttft, slowest = [], []
        for k in torch.randint(0, working_set, (args.ttft_requests,), generator=g).tolist():
            req = _requests(args, [None])[0]
            req.max_tokens = 1
            loads = cache.stats["store_loads"]
            t = time.perf_counter()
            req.delta = cache.get(accounts[k]).delta
            engine.generate([req])
            sync()
            ttft.append((time.perf_counter() - t) * 1e3)
            # where a slow request's time went: its store load (and the read within it), if it had one
            loaded = cache.stats["store_loads"] > loads
            slowest.append({"ttft_ms": ttft[-1], "load_ms": cache.stats["load_ms"][-1] if loaded else None,
                            "read_ms": cache.stats["read_ms"][-1] if loaded else None})
        out[f"ttft_{name}_p50_ms"], out[f"ttft_{name}_p99_ms"] = _pct(ttft, 0.5), _pct(ttft, 0.99)
        out[f"ttft_{name}_slowest"] = sorted(slowest, key=lambda r: -r["ttft_ms"])[:3]
        out[f"misses_{name}"] = cache.stats["misses"]
        cache.close()
    out["ttft_p99_ratio_4x_working_set"] = out["ttft_4x_working_set_p99_ms"] / out["ttft_all_hit_p99_ms"]
    return out


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
    dtype = torch.bfloat16 if CUDA else torch.float32
    base = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=dtype, device=DEV).eval()
    fp = fingerprint(base)
    shapes = {n: m.weight.numel() for n, m in target_linears(base).items()}
    res: dict = {"device": torch.cuda.get_device_name(0) if CUDA else "cpu", "config": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "deltas")
        t = time.perf_counter()
        accounts = [f"acct{a:05d}" for a in range(args.accounts)]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # torch and file writes release the GIL
            list(pool.map(lambda a: save_delta(store, accounts[a], random_delta(shapes, args.density, a), args.model,
                                               fp, "gspf", args.density), range(len(accounts))))
        res["publish_s"] = time.perf_counter() - t
        print(f"published {args.accounts} deltas in {res['publish_s']:.1f} s", flush=True)
        cache = DeltaCache(store, DEV, device_budget=1 << 40, host_budget=1, base_fingerprint=fp, dtype=dtype)
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
        made: list = []

        def compiled() -> DeltaBatchEngine:  # the engine with torch.compile on its base step, made once
            if not made:
                made.append(DeltaBatchEngine(spare, slots=args.batch, max_len=args.prompt + args.new_tokens,
                                             compile=True))
            return made[0]
        # Our engine first, the slow baselines last; the JSON is rewritten after every section so a
        # run cut short by its time limit still reports what it measured.
        # "decode": the runs the headline ratios compare, taking turns (timed_together)
        sections = [("decode", lambda: timed_together({
                        "ours_base": (engine, _requests(args, [None] * args.batch)),
                        "ours_mixed": (engine, _requests(args, deltas)),  # their layouts kept from earlier runs
                        # the same accounts laid out anew in every run (as accounts not served lately)
                        "ours_mixed_new_layouts": (engine, _requests(args, deltas), engine._table and
                                                   engine._table.clear_layouts),
                        "ours_single_account": (engine, _requests(args, [deltas[0]] * args.batch)),
                        "ours_base_separate": (separate, _requests(args, [None] * args.batch)),
                        "ours_mixed_separate": (separate, _requests(args, deltas))})),
                    ("admission", lambda: admission(engine, args, deltas)),
                    ("ours_single_account_segmented", lambda: unmerged(
                        engine, lambda: timed_generate(engine, _requests(args, [deltas[0]] * args.batch)))),
                    ("ours_mixed_churn", lambda: churn(engine, args, deltas)),
                    ("ours_base_compiled", lambda: timed_generate(compiled(), _requests(args, [None] * args.batch))),
                    ("ours_mixed_compiled", lambda: timed_generate(compiled(), _requests(args, deltas))),
                    ("ours_single_account_compiled", lambda: timed_generate(
                        compiled(), _requests(args, [deltas[0]] * args.batch))),
                    ("ours_base_eager", lambda: timed_generate(eager, _requests(args, [None] * args.batch))),
                    ("ours_mixed_eager", lambda: timed_generate(eager, _requests(args, deltas))),
                    ("hf_generate_base", lambda: hf_generate(base, args)),
                    ("merge_restore", lambda: merge_restore(base, args, deltas[: min(16, len(deltas))])),
                    ("latency", lambda: cache_latency(args, engine, store, fp, accounts, nbytes, shapes)),
                    ("peft_mixed", lambda: peft_mixed(base, args)),
                    ("profile", lambda: profile_decode(engine, _requests(args, deltas), args.out))]
        for name, run in sections:
            if name in args.skip or (name in ("profile", "admission") and not args.profile):
                continue
            t = time.perf_counter()
            got = run()
            for key, r in (got.items() if name == "decode" else [(name, got)]):
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
            res[key] = res[section]["tokens_per_s"] / res["ours_base_compiled"]["tokens_per_s"]
    if "latency" in res:
        res.update({k: res["latency"][k] for k in ("cold_load_p50_ms", "cold_load_p99_ms",
                                                    "ttft_p99_ratio_4x_working_set")})
    if "peft_mixed" in res:
        res["mixed64_speedup_vs_peft"] = res["ours_mixed"]["tokens_per_s"] / res["peft_mixed"]["tokens_per_s"]
    write_result(args.out, "serving", res["device"], res)
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
    return res


if __name__ == "__main__":
    main()
