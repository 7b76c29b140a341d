"""Per-account style fidelity: held-out perplexity of the base vs full FT vs LoRA (rank matched to
GSPF's trainable count) vs GSPF 0.3% (re-selecting, and with a static mask), on real accounts.

    python benchmarks/gspf_quality.py --base pretrain:gpu --procs 6 --tag h100   # one GPU job, < 10 min
    python benchmarks/gspf_quality.py --base smollm2-135m --accounts 1 --epochs 2 --lr-accounts 0 \
        --seq-len 64 --methods full lora gspf --tag cpu-smollm2

Accounts: the 12 creators of tiktok-accounts-dev.csv with >= 100 posts (time split) and the 20 of
accounts-dev.jsonl (source order); the newest 20% of each account's posts are held out, exactly
as `tkllm ingest` splits (same parse, dedupe and split code, without Ray). Each method's learning
rate is picked per method from a small grid on a validation carve-out of the first accounts'
*train* posts (their newest 20%), never on the held-out posts. Gain = base ppl - method ppl per
account; reported as mean ± 95% CI over accounts; `gspf_gain_ratio_vs_full` = GSPF's mean gain /
full FT's. Also where GSPF's entries fall (pooled over accounts: final-quarter blocks and
module types vs their share of the weights). Writes gspf-quality-<tag>.json, .png, -placement.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.compute as pc
import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.data.accounts import SplitRules, split_account
from tkllm_ray.data.readers import parse_file
from tkllm_ray.data.samples import corpus_path, shared_data_dir
from tkllm_ray.data.tokenizer import load_tokenizer
from tkllm_ray.data.validate import RowRules
from tkllm_ray.models.load import load_base_model
from tkllm_ray.sparse.placement import concentration, heatmap_png, placement_table, pooled
from tkllm_ray.sparse.selection import budget
from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.train.single import train_account

DATASETS = {  # file, parse options, accounts kept (posts after dedupe)
    "tiktok": ("tiktok-accounts-dev.csv", "csv", RowRules(timestamp_unit="ks"), 100),
    "tweets": ("accounts-dev.jsonl", "jsonl", RowRules(), 20),
}
LR_GRID = {"full": [1e-5, 3e-5, 1e-4, 3e-4], "lora": [3e-4, 1e-3, 3e-3, 1e-2], "gspf": [1e-3, 3e-3, 1e-2, 3e-2]}
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 11: 2.20,
       12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09, 20: 2.09, 25: 2.06, 30: 2.04}


def load_accounts(data_dir: Path, limit: int | None = None) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """{dataset: {account: (train texts, held-out texts)}}, oldest first, split as ingest splits."""
    return {name: split_accounts(parse_file((data_dir / file).read_bytes(), file, fmt, rules), min_posts, limit)
            for name, (file, fmt, rules, min_posts) in DATASETS.items()}


def split_accounts(table, min_posts: int, limit: int | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """A parsed table's accounts with >= min_posts posts: {account: (train texts, held-out texts)},
    the newest 20% held out, as `tkllm ingest` splits; the first `limit` accounts by id."""
    table = table.filter(pc.is_null(table["quarantine_reason"]))
    accounts = {}
    for acct in sorted(set(table["account_id"].to_pylist())):
        rows = split_account(table.filter(pc.equal(table["account_id"], acct)), SplitRules(0.2, min_posts))
        texts = {s: [r["text"] for r in rows.to_pylist() if r["split"] == s] for s in ("train", "eval")}
        if texts["train"]:
            accounts[acct] = (texts["train"], texts["eval"])
    return dict(list(accounts.items())[:limit]) if limit else accounts


def lora_rank_matching(model, k: int) -> int:
    """The LoRA rank whose trainable count (r · Σ(in + out) over the same linears) is nearest k."""
    per_rank = sum(m.in_features + m.out_features for m in target_linears(model).values())
    return max(1, round(k / per_rank))


def ci95(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    df = len(xs) - 1
    t = T95.get(df) or (T95[max(d for d in T95 if d <= df)] if df < 30 else 1.96)
    return m, t * statistics.stdev(xs) / math.sqrt(len(xs))


class Runner:
    """Holds the base once; each fine-tune gets a fresh copy of it."""

    def __init__(self, base_spec: str, tokenizer: str, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(tokenizer)
        self.base = load_base_model(base_spec, len(self.tok), device=self.device, tokenizer_name=tokenizer)
        self.base_spec, self.tokenizer = base_spec, tokenizer
        self.k = budget(args.density, sum(m.weight.numel() for m in target_linears(self.base).values()))
        self.lora_rank = lora_rank_matching(self.base, self.k)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def run(self, method: str, lr: float, train: list[str], held_out: list[str], reselect_every: int = 5) -> dict:
        cfg = FinetuneConfig(account="quality", data="-", method=method, model=self.base_spec, tokenizer=self.tokenizer,
                             seq_len=self.args.seq_len, batch_size=self.args.batch_size, epochs=self.args.epochs,
                             lr=lr, density=self.args.density, warmup_steps=self.args.warmup_steps,
                             reselect_every=reselect_every, lora_rank=self.lora_rank, seed=self.args.seed,
                             device=self.device.type)
        run = train_account(cfg, copy.deepcopy(self.base), self.tok.eos_token_id, self.encode(train),
                            self.encode(held_out), progress=False)
        if run.delta is not None:  # where the selection fell, for the placement summary
            run.result["placement"] = placement_table({n: i for n, (i, _) in run.delta.items()}, run.shapes)
        return run.result


_WORKER: Runner | None = None  # one Runner per pool process


def _init_worker(cls: type, base_spec: str, args) -> None:
    global _WORKER
    _WORKER = cls(base_spec, base_spec, args)


def _run_task(task: tuple) -> dict:
    return _WORKER.run(*task)


class Fleet:
    """Runs fine-tunes in this process or, with --procs N, in N processes sharing the GPU: a 34M
    base leaves an H100 launch-bound, so independent fine-tunes overlap almost perfectly. Every
    task is the same deterministic function of its inputs either way. The pool's processes build
    a runner of the same class (a subclass of Runner: another benchmark's tasks)."""

    def __init__(self, runner: Runner, procs: int):
        self.runner, self.pool = runner, None
        if procs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                            initargs=(type(runner), runner.base_spec, runner.args))

    def run_many(self, tasks: list[tuple]) -> list[dict]:
        if self.pool is None:
            return [self.runner.run(*t) for t in tasks]
        return list(self.pool.map(_run_task, tasks))


def pick_lrs(fleet: Fleet, accounts: dict, n: int, grids: dict[str, list[float]] = LR_GRID) -> dict[str, dict]:
    """Per method, the grid lr with the lowest mean validation ppl on the first n accounts of each
    dataset, the validation posts being the newest 20% of their train posts."""
    chosen = {}
    picks = [tr for ds in accounts.values() for tr, _ in list(ds.values())[:n]]
    splits = [(tr[:max(1, round(len(tr) * 0.8))], tr[max(1, round(len(tr) * 0.8)):]) for tr in picks]
    tasks = [(m, lr, tr, va) for m, grid in grids.items() for lr in grid for tr, va in splits]
    ppls = iter(r["eval_ppl_after"] for r in fleet.run_many(tasks))
    for method, grid in grids.items():
        scores = {lr: statistics.fmean(math.log(next(ppls)) for _ in splits) for lr in grid}
        best = min(scores, key=scores.get)
        chosen[method] = {"lr": best, "val_mean_log_ppl": scores}
        print(f"lr {method}: {best} ({ {k: round(v, 3) for k, v in scores.items()} })", flush=True)
    return chosen


def summarize(rows: list[dict], methods: list[str]) -> dict:
    out = {}
    for scope in ["all", *sorted({r["dataset"] for r in rows})]:
        sel = [r for r in rows if scope == "all" or r["dataset"] == scope]
        s = {"accounts": len(sel), "base_ppl": ci95([r["base"] for r in sel])}
        for m in methods:
            gains = [r["base"] - r[m] for r in sel]
            s[m] = {"ppl": ci95([r[m] for r in sel]), "gain": ci95(gains),
                    "log_ppl_gain": ci95([math.log(r["base"] / r[m]) for r in sel])}
        s["gspf_gain_ratio_vs_full"] = s["gspf"]["gain"][0] / s["full"]["gain"][0]
        s["gspf_gain_ratio_vs_lora"] = s["gspf"]["gain"][0] / s["lora"]["gain"][0]
        out[scope] = s
    return out


def plot(summary: dict, methods: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = [s for s in summary if s != "all"] + ["all"]
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        means = [summary[s][m]["gain"][0] for s in scopes]
        errs = [summary[s][m]["gain"][1] for s in scopes]
        ax.bar([j + i * w for j in range(len(scopes))], means, w, yerr=errs, capsize=3, label=m)
    ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(scopes))],
                  [f"{s} (n={summary[s]['accounts']})" for s in scopes])
    ax.set_ylabel("held-out perplexity gain over base (mean ± 95% CI)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _pretrain(size: str, workdir: str, reuse: bool) -> str:
    """The base, pretrained now from the corpus alone (or, with --reuse-base, the one an earlier
    run left: pretrain_base renames a finished directory into place, so one that exists is whole)."""
    from pretrain_base import pretrain_base  # the sibling script (this script's folder is on sys.path)

    out = os.path.join(workdir, f"base-{size}")
    if os.path.isdir(out) and not reuse:
        shutil.rmtree(out)
    if not os.path.isdir(out):
        pretrain_base(str(corpus_path()), out, size=size, progress=False)
    return out


def _pretrain_record(base_dir: str) -> dict | None:
    """What pretrain_base.py measured (time, tokens, val ppl before/after), kept with the result."""
    path = os.path.join(base_dir, "pretrain.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def add_harness_args(ap: argparse.ArgumentParser) -> None:
    """The options every quality harness takes (this script's and ts_peft_quality.py's)."""
    ap.add_argument("--base", default="pretrain:gpu", help="pretrain:gpu|pretrain:cpu (train it now), a named "
                    "pretrained base (smollm2-135m) or a Hugging Face model directory with its tokenizer")
    ap.add_argument("--accounts", type=int, default=None, help="first N accounts of each dataset (default: all)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr-accounts", type=int, default=1, help="accounts per dataset for the lr pick (0: no pick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="runs/quality")
    ap.add_argument("--reuse-base", action="store_true", help="with pretrain:*, reuse the base a previous run saved")
    ap.add_argument("--procs", type=int, default=1, help="fine-tunes run in N processes sharing the device")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))


def harness_inputs(args, script: str) -> tuple[str, str]:
    """(the shared data directory, the base: a directory or name; pretrain:* trained or reused now)."""
    data_dir = shared_data_dir()
    if data_dir is None:
        raise SystemExit(f"{script} needs ../shared/data (or TKLLM_SHARED_DATA)")
    base = args.base
    if base.startswith("pretrain:"):
        base = _pretrain(base.split(":", 1)[1], args.workdir, args.reuse_base)
    return data_dir, base


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_harness_args(ap)
    ap.add_argument("--epochs", type=int, default=6, help="6: one GSPF re-selection (epoch 5)")
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=["full", "lora", "gspf", "gspf_static"],
                    choices=["full", "lora", "gspf", "gspf_static"], help="full, lora and gspf are required")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data_dir, base = harness_inputs(args, "gspf_quality")
    runner = Runner(base, base, args)
    accounts = load_accounts(data_dir, args.accounts)
    print(f"base {args.base}: {sum(p.numel() for p in runner.base.parameters()):,} params on {runner.device}; "
          f"GSPF k={runner.k:,}, LoRA r={runner.lora_rank}; accounts "
          f"{ {d: len(a) for d, a in accounts.items()} } [{time.perf_counter() - t0:.0f}s]", flush=True)
    methods = args.methods
    if not {"full", "lora", "gspf"} <= set(methods):
        raise SystemExit("--methods must include full, lora and gspf (the ratios compare them)")
    fleet = Fleet(runner, args.procs)
    lrs = pick_lrs(fleet, accounts, args.lr_accounts) if args.lr_accounts else {m: {"lr": g[1]} for m, g in LR_GRID.items()}
    print(f"[{time.perf_counter() - t0:5.0f}s] learning rates picked", flush=True)
    jobs = [(ds, acct, train, held_out, m) for ds, accts in accounts.items()
            for acct, (train, held_out) in accts.items() for m in methods]
    results = fleet.run_many([("gspf" if m.startswith("gspf") else m, lrs["gspf" if m.startswith("gspf") else m]["lr"],
                               train, held_out, 0 if m == "gspf_static" else 5) for _, _, train, held_out, m in jobs])
    rows, by_account, costs, placements = [], {}, defaultdict(list), []
    for (ds, acct, train, held_out, m), r in zip(jobs, results):
        row = by_account.get((ds, acct))
        if row is None:
            row = by_account[(ds, acct)] = {"dataset": ds, "account": acct, "train_posts": len(train),
                                            "eval_posts": len(held_out)}
            rows.append(row)
        row["base"], row[m] = r["eval_ppl_before"], r["eval_ppl_after"]
        costs[m].append({k: r[k] for k in ("trainable_params", "step_time_s", "steps", "train_state_bytes")})
        if m == "gspf":
            placements.append(r["placement"])
    for row in rows:
        print(f"{row['dataset']}/{row['account']}: " + " ".join(f"{m} {row[m]:.1f}" for m in ["base", *methods]))
    summary = summarize(rows, methods)
    where = pooled(placements)
    result = {"gspf_gain_ratio_vs_full": summary["all"]["gspf_gain_ratio_vs_full"],
              "gspf_gain_ratio_vs_lora": summary["all"]["gspf_gain_ratio_vs_lora"],
              "targets": {"gain_ratio_vs_full_min": 0.9, "gain_ratio_vs_lora_min": 1.0},
              "base": args.base, "pretrain": _pretrain_record(base), "device": str(runner.device) if runner.device.type == "cpu"
              else torch.cuda.get_device_name(0), "gspf_k": runner.k, "lora_rank": runner.lora_rank,
              "learning_rates": lrs, "config": vars(args), "summary": summary,
              "costs": {m: {k: statistics.fmean(c[k] for c in cs) for k in cs[0]} for m, cs in costs.items()},
              "placement": {"concentration": concentration(where), "table": where},
              "accounts": rows, "wall_s": time.perf_counter() - t0}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"gspf-quality-{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(summary, methods, stem + ".png", f"{args.base}: held-out ppl gain per method "
         f"(GSPF {args.density:.1%}, LoRA r={runner.lora_rank})")
    with open(stem + "-placement.png", "wb") as f:
        f.write(heatmap_png(where, f"GSPF {args.density:.1%} selection on {args.base}, "
                                   f"mean over {len(placements)} accounts"))
    print(f"gspf_gain_ratio_vs_full {result['gspf_gain_ratio_vs_full']:.3f}, vs lora "
          f"{result['gspf_gain_ratio_vs_lora']:.3f}; wrote {stem}.json [{result['wall_s']:.0f}s]", flush=True)
    return result


if __name__ == "__main__":
    main()
