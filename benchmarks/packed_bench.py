"""Packed multi-account GSPF vs one account at a time vs one HF Trainer + peft LoRA job per account,
on one device, same synthetic accounts (issue 4's benchmark).

    python benchmarks/packed_bench.py --tune --phase-times     # GPU: tkllm-s bf16, 1,000 accounts queued
    python benchmarks/packed_bench.py --modes resident --other-seconds 300    # 1,000 in flight, paged
    python benchmarks/packed_bench.py --model tkllm-tiny --accounts 12 --seconds 20 --hf-accounts 2   # CPU smoke

Each account: `--captions` captions of `--tokens` random token ids, `--epochs` epochs, GSPF at
`--density`, static mask. Modes: `packed` (max-resident accounts in flight, mixed micro-batches),
`unpacked` (the same engine, one account at a time, base loaded once), `hf_peft` (per account:
load the base from local disk, peft LoRA, transformers Trainer, save; peft_job.py), `hf_peft_jobs`
(the same as a fresh process per account: a job per account), `resident` (1,000 accounts in
flight, states paged to pinned host memory). Each mode runs for at most its wall budget (a
command has 10 minutes); accounts/hour counts the accounts finished in that window (ramp-up
included), the steady rate those between the first and the last completion, and a cross-check
from the tokens trained. MFU counts 4·N FLOPs per trained token (forward 2N + input-gradient 2N
through the whole stack; GSPF's sampled weight gradient is ~0.3% of a dense one) against the
device's dense bf16 peak. Writes packed-<device>.json after every mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Set before CUDA starts: the dense route's per-module buffers vary in size from layer to layer, and
# a fixed-segment cache fragments around them next to a large resident state budget.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.models import build_model
from tkllm_ray.sparse.mixed import swap_out
from tkllm_ray.train.packed import AccountJob, PackedGSPF
import peft_job  # sibling modules: this script's folder is on sys.path
from results_io import sync, write_result

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def make_jobs(args, n: int, offset: int = 0) -> list[AccountJob]:
    jobs = []
    for a in range(offset, offset + n):
        g = torch.Generator().manual_seed(a)
        posts = torch.randint(2, args.vocab, (args.captions, args.tokens), generator=g).tolist()
        cfg = FinetuneConfig(account=f"acct{a:05d}", data="-", method="gspf", epochs=args.epochs, density=args.density,
                             seq_len=args.seq_len, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                             reselect_every=0, lr=1e-3, seed=a)
        jobs.append(AccountJob(cfg, posts, []))
    return jobs


def _timed(obj, name: str, phases: dict) -> None:
    """Diagnostics (--phase-times): wall time per engine phase, the device synchronized around
    each call (which costs some overlap: use for where-does-time-go, not for the headline)."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        sync()
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            sync()
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, wrapper)


def run_engine(args, base, jobs, seconds: float, max_resident: int, budget: int | None,
               host_budget: int | None = None) -> dict:
    """The packed engine (max_resident=1: one account at a time, model loaded once) for <= seconds.
    `accounts_per_hour` counts completions over the whole window, ramp-up included;
    `steady_accounts_per_hour` those between the first and the last completion."""
    engine = PackedGSPF(base, max_resident=max_resident, max_rows=args.max_rows, state_budget=budget,
                        host_budget=host_budget)
    phases: dict = {}
    if args.phase_times:
        for name in ("_sensitivity_pass", "_select_round", "_train_step"):
            _timed(engine, name, phases)
        _timed(engine.pager, "prepare", phases)
    done, tokens = [], [0]
    t0 = time.perf_counter()
    prof = _Profile(args.profile, args.out, args.profile_from) if args.profile and max_resident > 1 else None

    def stop(eng, picked=()):
        tokens[0] += sum(int((b[1] != -100).sum()) for _, b in picked)
        if prof and picked:  # train steps only
            prof.step()
        if time.perf_counter() - t0 > seconds:
            raise TimeoutError

    engine.on_step = stop
    warm = engine._sensitivity_pass  # the deadline holds during warm-ups too

    def warm_then_check(picked):
        ready = warm(picked)  # the accounts whose warm-up ended: the engine selects for them next
        stop(engine)
        return ready

    engine._sensitivity_pass = warm_then_check
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        engine.run(jobs, 0, lambda u, d: done.append(time.perf_counter() - t0))
    except TimeoutError:
        pass
    wall = time.perf_counter() - t0
    if prof:
        prof.finish()
    per_account = args.captions * (args.tokens + 1) * args.epochs  # +1: the EOS closing each caption
    steady = (len(done) - 1) * 3600 / (done[-1] - done[0]) if len(done) > 2 and done[-1] > done[0] else None
    out = {"accounts_done": len(done), "wall_s": wall, "accounts_per_hour": 3600 * len(done) / wall,
           "steady_accounts_per_hour": steady, "first_done_s": done[0] if done else None,
           "train_tokens_per_s": tokens[0] / wall, "accounts_per_hour_by_tokens": 3600 * tokens[0] / wall / per_account,
           "max_resident_accounts": engine.stats["max_resident"], "device_budget_gib": budget and budget / 2**30,
           "host_budget_gib": host_budget and host_budget / 2**30, **engine.stats, **engine.pager.stats}
    if phases:
        out["phase_s"] = phases
    if torch.cuda.is_available():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    swap_out(base)  # hand the plain base back for the next mode
    return out


class _Profile:
    """--profile N: torch.profiler over train steps F..F+N of the packed mode (F: --profile-from); the
    op table goes to <out>/packed-profile.txt (where the device time goes, by kernel)."""

    def __init__(self, steps: int, out: str, start: int = 3):
        self.steps, self.out, self.n, self.prof, self.start = steps, out, 0, None, start

    def step(self) -> None:
        self.n += 1
        if self.n == self.start:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif self.n == self.start + self.steps:
            self.finish()

    def finish(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "packed-profile.txt"), "w") as f:
                f.write(self.prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
                f.write(self.prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
            self.prof = None


def _host_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


def run_hf_peft(args, base, n: int, jobs: bool = False) -> dict:
    """What a user does today (peft_job.py): per account, load the base from local disk, wrap it
    in peft LoRA, train with transformers.Trainer, save the adapter; in this process, or
    (`jobs`) as a fresh process per account, which also pays the imports and CUDA start-up."""
    dtype = next(base.parameters()).dtype
    batch = args.batch_size * args.seq_len // (args.tokens + 1)  # the rows of our batches, as captions
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(os.path.join(d, "base"))
        t0, done = time.perf_counter(), 0
        for job in make_jobs(args, n, offset=10_000):
            out = os.path.join(d, "adapters", job.cfg.account)
            if jobs:
                posts = os.path.join(d, f"{job.cfg.account}.json")
                with open(posts, "w") as f:
                    json.dump(job.train_posts, f)
                subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "peft_job.py"), "--base",
                                os.path.join(d, "base"), "--posts", posts, "--out", out, "--epochs", str(args.epochs),
                                "--batch", str(batch)], check=True, stdout=subprocess.DEVNULL)
            else:
                peft_job.train_one(os.path.join(d, "base"), job.train_posts, out, args.epochs, batch, dtype,
                                   str(base.device))
            done += 1
            if time.perf_counter() - t0 > args.seconds:
                break
        wall = time.perf_counter() - t0
    return {"accounts_done": done, "wall_s": wall, "s_per_account": wall / done, "accounts_per_hour": 3600 * done / wall}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tkllm-s")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--accounts", type=int, default=1000)
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=128, help="rows per micro-batch (16 accounts' batches)")
    ap.add_argument("--max-resident", type=int, default=64, help="packed mode: accounts in flight (32 fill a "
                    "micro-batch of max-rows 256; more only adds paging)")
    ap.add_argument("--resident-accounts", type=int, default=1000, help="resident mode: accounts in flight at once")
    ap.add_argument("--state-gb", type=float, default=None, help="device state budget (default: 60%% of free memory)")
    ap.add_argument("--host-gb", type=float, default=None, help="resident mode: pinned host memory for paged "
                    "states (default: 70%% of available host memory)")
    ap.add_argument("--seconds", type=float, default=180, help="wall budget of the packed mode")
    ap.add_argument("--other-seconds", type=float, default=90, help="wall budget of each other mode")
    ap.add_argument("--hf-accounts", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["packed", "resident", "unpacked", "hf_peft", "hf_peft_jobs"],
                    choices=["packed", "resident", "unpacked", "hf_peft", "hf_peft_jobs"],
                    help="hf_peft: the peft baseline in this process; hf_peft_jobs: a process per account")
    ap.add_argument("--phase-times", action="store_true", help="diagnostics: time each engine phase (syncs)")
    ap.add_argument("--profile", type=int, default=0, help="diagnostics: profile N packed train steps")
    ap.add_argument("--profile-from", type=int, default=3, help="diagnostics: the train step the profile starts at "
                    "(later: the steady mix of warm-ups and training)")
    ap.add_argument("--tune", action="store_true", help="first sweep the segmented kernels' tiles and time a "
                    "selection (packed_kernels.py, its own JSON), then train with the fastest tiles")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if args.tune and cuda:
        import packed_kernels  # the sibling script (this script's folder is on sys.path)

        packed_kernels.main(["--out", args.out])
    base = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=torch.bfloat16 if cuda else torch.float32,
                       device=dev)
    n_params = sum(p.numel() for p in base.parameters())
    budget = int(args.state_gb * 2**30) if args.state_gb else (int(0.6 * torch.cuda.mem_get_info()[0]) if cuda else None)
    host = int(args.host_gb * 2**30) if args.host_gb else int(0.7 * _host_available())
    results = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        if mode.startswith("hf_peft"):
            results[mode] = run_hf_peft(args, base, args.hf_accounts, jobs=mode == "hf_peft_jobs")
        elif mode == "resident":  # paging: far more accounts in flight than device memory holds
            results[mode] = run_engine(args, base, make_jobs(args, args.resident_accounts), args.other_seconds,
                                       args.resident_accounts, budget or host, host)
        else:
            packed = mode == "packed"
            results[mode] = run_engine(args, base, make_jobs(args, args.accounts), args.seconds if packed else
                                       args.other_seconds, args.max_resident if packed else 1, budget)
        print(f"[{time.perf_counter() - t0:5.0f}s] {mode}: {json.dumps(results[mode])[:400]}", flush=True)
        out = _write(args, results, n_params)  # after every mode: a cut-off run keeps what it measured
    return out


def _write(args, results: dict, n_params: int) -> dict:
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    packed = results.get("packed", {})
    try:
        from tkllm_ray.sparse.segmented_triton import CONFIG
    except ImportError:  # no triton: the CPU reference ran
        CONFIG = None
    out = {"device": name, "config": vars(args), "kernel_tiles": CONFIG, "params": n_params,
           "accounts_per_hour": packed.get("accounts_per_hour"),
           "steady_accounts_per_hour": packed.get("steady_accounts_per_hour"),
           # against the peft workflow as jobs (a process per account) where measured, else in this process
           "speedup_vs_hf_peft": _ratio(packed, results.get("hf_peft_jobs") or results.get("hf_peft")),
           "speedup_vs_hf_peft_in_process": _ratio(packed, results.get("hf_peft")),
           "speedup_vs_unpacked": _ratio(packed, results.get("unpacked")),
           # accounts in flight that held a selected, training state at once (admitted-only don't count)
           "max_resident_accounts": max((r.get("max_resident_with_state") or 0) for r in results.values()) or None,
           "mfu": packed["train_tokens_per_s"] * 4 * n_params / (peak * 1e12) if peak and packed else None,
           "modes": results}
    write_result(args.out, "packed", name, out)
    return out


def _ratio(a: dict | None, b: dict | None):
    if not a or not b or not b.get("accounts_per_hour"):
        return None
    return a["accounts_per_hour"] / b["accounts_per_hour"]


if __name__ == "__main__":
    main()
