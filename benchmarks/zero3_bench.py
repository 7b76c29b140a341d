"""Packed GSPF over a DeepSpeed ZeRO-3 sharded base vs full fine-tuning under ZeRO-3, on the same
Ray Train worker group (issue 4's 7B benchmark).

    python benchmarks/zero3_bench.py                    # GPU: tkllm-l (7B) bf16 on 2 GPUs
    python benchmarks/zero3_bench.py --model tkllm-tiny --workers 2 --seconds 20 --ft-steps 2   # CPU smoke

Each worker (one GPU) holds half of every base weight. `packed`: the worker's share of synthetic
accounts (packed_bench.make_jobs: --captions captions of --tokens random ids, --epochs epochs,
density --density, static mask), trained for --seconds with the workers in lockstep; accounts/hour
counts both workers' completions in the window (ramp-up included). `full_ft`: the same base,
every weight trainable (AdamW, bf16 weights, fp32 master copy and moments, all sharded), --ft-rows
rows of --seq-len tokens per worker and step: step time, tokens/s, peak memory. Writes
zero3-<device>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import torch

from results_io import sync, write_result  # sibling module: this script's folder is on sys.path


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def packed(args, device, rank: int, world: int) -> dict:
    from packed_bench import _timed, make_jobs

    from tkllm_ray.train.packed import PackedGSPF
    from tkllm_ray.train.zero3 import Lockstep, load_sharded_base

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = time.perf_counter()
    model = load_sharded_base(args.model, args.vocab, 0, dtype, device)
    load_s = time.perf_counter() - t
    budget = int(args.state_gb * 2**30) if args.state_gb else None
    engine = PackedGSPF(model, max_resident=args.max_resident, max_rows=args.max_rows, state_budget=budget,
                        lockstep=Lockstep(device))
    tokens, done = [0], []

    def count(eng, picked):
        tokens[0] += sum(int((b[1] != -100).sum()) for _, b in picked)

    engine.on_step = count
    phases: dict = {}
    for name in ("_sensitivity_pass", "_select_round", "_train_step", "_idle_pass"):
        _timed(engine, name, phases)  # wall time per phase (synchronized around each call)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stats = engine.run(make_jobs(args, args.accounts, offset=rank * args.accounts), 0,
                       lambda u, d: done.append(time.perf_counter() - t0),
                       until=lambda: time.perf_counter() - t0 > args.seconds)
    wall = time.perf_counter() - t0
    out = {"load_s": load_s, "wall_s": wall, "accounts_done": len(done), "first_done_s": done[0] if done else None,
           "train_tokens": tokens[0], "peak_memory_gib": _peak_gib(), "phase_s": phases, **stats}
    del engine, model
    return out


def full_ft(args, device) -> dict:
    import deepspeed

    from tkllm_ray.models import build_model
    from tkllm_ray.train.zero3 import ds_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=dtype, device=device)
    cfg = ds_config(dtype, model.config.hidden_size)
    cfg["train_micro_batch_size_per_gpu"] = args.ft_rows
    cfg["gradient_clipping"] = 1.0
    cfg["zero_optimization"]["contiguous_gradients"] = True
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # a client AdamW (torch's): DeepSpeed keeps its fp32 master weights and moments sharded
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    del model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, args.vocab, (args.ft_rows, args.seq_len), generator=g).to(device)
    times = []
    for step in range(args.ft_steps + 1):  # the first step (allocation, tracing) is not timed
        sync()
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync()
        if step:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    out = {"rows": args.ft_rows, "seq_len": args.seq_len, "steps_timed": len(times), "step_s_median": step_s,
           "tokens_per_s_per_worker": args.ft_rows * args.seq_len / step_s, "peak_memory_gib": _peak_gib(),
           "loss_last": float(loss)}
    engine.destroy()
    return out


def worker(config: dict) -> None:
    import ray.train
    from ray.train.torch import get_device

    args = argparse.Namespace(**config["args"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device() if torch.cuda.is_available() else torch.device("cpu")
    out = {"rank": rank, "world": world}
    path = os.path.join(config["shared"], f"rank{rank}.json")
    if "packed" in args.modes:
        out["packed"] = packed(args, device, rank, world)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(out, f)
    if "full_ft" in args.modes:
        try:
            out["full_ft"] = full_ft(args, device)
        except torch.OutOfMemoryError as e:  # recorded, not fatal: the packed numbers stand
            out["full_ft"] = {"error": f"out of memory: {str(e)[:300]}", "peak_memory_gib": _peak_gib()}
        with open(path, "w") as f:
            json.dump(out, f)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tkllm-l")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--accounts", type=int, default=200, help="accounts queued per worker")
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=39, help="token ids per caption (+1 EOS: 40)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per account step")
    ap.add_argument("--warmup-steps", type=int, default=8)
    ap.add_argument("--max-resident", type=int, default=64)
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--state-gb", type=float, default=None, help="device budget of the account states and "
                    "warm-up sums per worker (7B: each warming account holds ~26 GB of fp32 sums)")
    ap.add_argument("--seconds", type=float, default=240, help="packed window")
    ap.add_argument("--ft-rows", type=int, default=32)
    ap.add_argument("--ft-steps", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["packed", "full_ft"], choices=["packed", "full_ft"])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cuda = torch.cuda.is_available()
    here = os.path.dirname(os.path.abspath(__file__))  # the workers import this folder's modules too
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=max(2, args.workers * 2), include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    shared = tempfile.mkdtemp(prefix="zero3-bench-")
    t0 = time.perf_counter()
    TorchTrainer(worker, train_loop_config={"args": vars(args), "shared": shared},
                 scaling_config=ray.train.ScalingConfig(num_workers=args.workers, use_gpu=cuda),
                 run_config=ray.train.RunConfig(storage_path=shared, name="zero3")).fit()
    ranks = [json.load(open(os.path.join(shared, f"rank{r}.json"))) for r in range(args.workers)]
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    out = {"device": name, "gpus": args.workers if cuda else 0, "config": vars(args), "wall_s": time.perf_counter() - t0,
           "ranks": ranks}
    if "packed" in args.modes:
        p = [r["packed"] for r in ranks]
        wall = max(x["wall_s"] for x in p)
        done = sum(x["accounts_done"] for x in p)
        out["packed"] = {"accounts_done": done, "window_s": wall, "accounts_per_hour": 3600 * done / wall,
                         "train_tokens_per_s": sum(x["train_tokens"] for x in p) / wall,
                         "peak_memory_gib_per_gpu": max((x["peak_memory_gib"] or 0) for x in p) or None,
                         "max_resident_per_worker": max(x["max_resident"] for x in p),
                         "idle_passes": sum(x.get("idle_passes", 0) for x in p)}
    if "full_ft" in args.modes and any("error" in r["full_ft"] for r in ranks):
        out["full_ft"] = next(r["full_ft"] for r in ranks if "error" in r["full_ft"])
    elif "full_ft" in args.modes:
        f = [r["full_ft"] for r in ranks]
        step = max(x["step_s_median"] for x in f)
        per_account = args.captions * (args.tokens + 1) * args.epochs
        tps = sum(x["rows"] * x["seq_len"] for x in f) / step
        out["full_ft"] = {"step_s": step, "tokens_per_s": tps, "rows_per_worker": args.ft_rows,
                          "peak_memory_gib_per_gpu": max((x["peak_memory_gib"] or 0) for x in f) or None,
                          # one account after another at this rate (its own full model copy aside)
                          "accounts_per_hour_at_this_rate": 3600 * tps / per_account}
    path = write_result(args.out, "zero3", f"{name}-x{args.workers}" if cuda else "cpu", out)
    print(json.dumps({k: v for k, v in out.items() if k != "ranks"}, indent=1), "\n->", path, flush=True)
    return out


if __name__ == "__main__":
    main()
