"""Token-selective PEFT quality (issue 6): held-out perplexity gain over the base of LoRA, TS-LoRA,
DoRA and TS-DoRA at one rank, per account, and the share of tokens the token-selective ones update.

    python benchmarks/ts_peft_quality.py --base pretrain:gpu --procs 6 --keep-top 0.5 --tag h100  # one H100 job
    python benchmarks/ts_peft_quality.py --base pretrain:cpu --accounts 2 --synthetic 2 --epochs 2 \
        --seq-len 64 --keep-top 0.5 --tag cpu                                                # CPU, minutes

On one H100 the full set (40 accounts) should take ~7 min: 8 of them took 190 s, pretraining 82 s
of it (ts-peft-h100-trial-8accounts.json). On 2 CPU cores the second command takes 5-9 min (busy
cores) plus the base's ~2.5 min (`--workdir runs --reuse-base` reuses the one in runs/base-cpu).

Accounts as gspf_quality takes them (the 12 creators of tiktok-accounts-dev.csv, the 20 of
accounts-dev.jsonl; the newest 20% of each held out as `tkllm ingest` splits), plus --synthetic N
creators from data/synth.py, split the same way. Every method adapts the same linears at --rank;
LoRA is peft's, DoRA is TS-DoRA with its gate held open (τ = 0, never updated). Each method's lr is
picked from a grid on a validation carve-out of the first --lr-accounts accounts' *train* posts
(gspf_quality.pick_lrs), never on the held-out posts. Gain = base ppl - method ppl per account,
mean ± 95% CI over accounts. For the token-selective methods: the activation rate (share of real
tokens, padding excluded, whose update the gate let through; all modules pooled) in the last
training epoch and at inference on the held-out posts, and the share of the adapters' per-token
FLOPs skipped at inference (TS-LoRA skips its B projection; TS-DoRA's gate needs the whole update).
--keep-top F, the paper's module selection: TS-LoRA retrained from scratch on the F least sparse
of its modules, ranked by each account's TS-LoRA training activation rates (`ts_peft.top_names`,
`keep_top`'s rule), at TS-LoRA's lr. Writes ts-peft-<tag>.json and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time

import torch

from gspf_quality import (Fleet, Runner, _pretrain_record, add_harness_args, ci95, harness_inputs, load_accounts,
                          pick_lrs, split_accounts)
from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.data.readers import parse_file
from tkllm_ray.data.synth import generate_records
from tkllm_ray.data.tokenizer import load_tokenizer
from tkllm_ray.data.validate import RowRules
from tkllm_ray.models.load import load_base_model
from tkllm_ray.train.single import train_account
from tkllm_ray.train.ts_peft import top_names

METHODS = ["lora", "ts-lora", "dora", "ts-dora"]
TOP = "ts-lora-top"  # TS-LoRA on the kept modules (--keep-top)
SELECTIVE = ("ts-lora", "ts-dora", TOP)
LR_GRID = {m: [3e-4, 1e-3, 3e-3, 1e-2] for m in METHODS}  # the pick fell on 1e-3 on the H100, 1e-2 on the CPU
TS_FIELDS = ("ts_target_rate", "ts_penalty", "ts_tau_lr", "ts_bandwidth")


class TSRunner(Runner):
    """gspf_quality's Runner (the base held once, a fresh copy per fine-tune) for these methods."""

    def __init__(self, base_spec: str, tokenizer: str, args):  # no GSPF budget to size here
        self.args, self.base_spec, self.tokenizer = args, base_spec, tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = load_tokenizer(tokenizer)
        self.base = load_base_model(base_spec, len(self.tok), device=self.device, tokenizer_name=tokenizer)

    def run(self, method: str, lr: float, train: list[str], held_out: list[str], modules: list[str] | None = None):
        a = self.args
        cfg = FinetuneConfig(account="quality", data="-", method="ts-lora" if method == TOP else method,
                             model=self.base_spec, tokenizer=self.tokenizer, seq_len=a.seq_len,
                             batch_size=a.batch_size, epochs=a.epochs, lr=lr, lora_rank=a.rank,
                             target_modules=modules, seed=a.seed, device=self.device.type,
                             **{f: getattr(a, f) for f in TS_FIELDS if getattr(a, f) is not None})
        r = train_account(cfg, copy.deepcopy(self.base), self.tok.eos_token_id, self.encode(train),
                          self.encode(held_out), progress=False).result
        out = {k: r[k] for k in ("eval_ppl_before", "eval_ppl_after", "steps", "trainable_params", "step_time_s")}
        if "token_selective" in r:
            tr, ev = r["token_selective"]["train"], r["token_selective"]["eval"]
            out.update(train_rate=tr["activation_rate"], eval_rate=ev["activation_rate"],
                       skipped_flops_share=ev["skipped_flops_share"], modules=tr["per_module"])
        return out


def synthetic_accounts(n: int, posts: int, seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """n creators of data/synth.py, parsed and split as the real files are."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_records(n, posts, seed))
    return split_accounts(parse_file(text.encode(), "synth.jsonl", "jsonl", RowRules()), 20)


def summarize(rows: list[dict], methods: list[str]) -> dict:
    out = {}
    for scope in ["all", *sorted({r["dataset"] for r in rows})]:
        sel = [r for r in rows if scope == "all" or r["dataset"] == scope]
        s = {"accounts": len(sel), "base_ppl": ci95([r["base_ppl"] for r in sel])}
        for m in methods:
            runs = [r["methods"][m] for r in sel]
            s[m] = {"ppl": ci95([x["ppl"] for x in runs]), "gain": ci95([x["gain"] for x in runs]),
                    "log_ppl_gain": ci95([math.log(r["base_ppl"] / r["methods"][m]["ppl"]) for r in sel])}
            for k in ("train_rate", "eval_rate", "skipped_flops_share"):
                if k in runs[0]:
                    s[m][k] = ci95([x[k] for x in runs])
        ratio = lambda a, b: s[a]["gain"][0] / s[b]["gain"][0] if b in s and s[b]["gain"][0] else None  # noqa: E731
        s["ratios"] = {"ts_lora_vs_lora": ratio("ts-lora", "lora"), "ts_dora_vs_dora": ratio("ts-dora", "dora"),
                       "dora_vs_lora": ratio("dora", "lora")}
        if TOP in methods:
            s["ratios"].update(ts_lora_top_vs_lora=ratio(TOP, "lora"), ts_lora_top_vs_ts_lora=ratio(TOP, "ts-lora"))
        out[scope] = s
    return out


def module_rates(rows: list[dict], method: str) -> dict[str, float]:
    """Each module's training activation rate, averaged over accounts (what the selection ranks by)."""
    per = [r["methods"][method]["modules"] for r in rows]
    return {n: round(statistics.fmean(p[n] for p in per), 4) for n in per[0]}


def plot(summary: dict, methods: list[str], target: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scopes = [s for s in summary if s != "all"] + ["all"]
    ticks = [f"{s} (n={summary[s]['accounts']})" for s in scopes]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    w = 0.8 / len(methods)
    for i, m in enumerate(methods):
        gains = [summary[s][m]["gain"] for s in scopes]
        ax.bar([j + i * w for j in range(len(scopes))], [g[0] for g in gains], w,
               yerr=[0 if math.isnan(g[1]) else g[1] for g in gains], capsize=3, label=m)
    ax.set_xticks([j + w * (len(methods) - 1) / 2 for j in range(len(scopes))], ticks, fontsize=8)
    ax.set_ylabel("held-out ppl gain over base (mean ± 95% CI)")
    ax.legend(fontsize=8)
    sel = [m for m in methods if m in SELECTIVE]
    w2 = 0.8 / (2 * len(sel))
    for i, (m, k) in enumerate((m, k) for m in sel for k in ("train_rate", "eval_rate")):
        vals = [summary[s][m][k] for s in scopes]
        ax2.bar([j + i * w2 for j in range(len(scopes))], [v[0] for v in vals], w2,
                yerr=[0 if math.isnan(v[1]) else v[1] for v in vals], capsize=2,
                label=f"{m} {'training (last epoch)' if k == 'train_rate' else 'inference'}")
    ax2.axhline(target, color="grey", ls="--", lw=1, label=f"target {target:g}")
    ax2.set_xticks([j + w2 * (2 * len(sel) - 1) / 2 for j in range(len(scopes))], ticks, fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("share of tokens updated (activation rate)")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_harness_args(ap)
    ap.add_argument("--synthetic", type=int, default=8, help="synthetic creators (data/synth.py) added")
    ap.add_argument("--synthetic-posts", type=int, default=120)
    ap.add_argument("--rank", type=int, default=8, help="adapter rank of every method")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--keep-top", type=float, default=0.0, help="also TS-LoRA on this share of its least sparse "
                    "modules, retrained from scratch (0: off)")
    defaults = FinetuneConfig.model_fields
    for f in TS_FIELDS:
        ap.add_argument("--" + f.replace("_", "-"), type=float, default=None,
                        help=f"default {defaults[f].default}: {defaults[f].description}")
    args = ap.parse_args(argv)
    if not 0 <= args.keep_top <= 1:
        raise SystemExit("--keep-top is a share of the modules, in (0, 1] (0: off)")
    t0 = time.perf_counter()
    data_dir, base = harness_inputs(args, "ts_peft_quality")
    runner = TSRunner(base, base, args)
    accounts = load_accounts(data_dir, args.accounts)
    if args.synthetic:
        accounts["synthetic"] = synthetic_accounts(args.synthetic, args.synthetic_posts, args.seed)
    print(f"base {args.base}: {sum(p.numel() for p in runner.base.parameters()):,} params on {runner.device}; "
          f"rank {args.rank}; accounts { {d: len(a) for d, a in accounts.items()} } "
          f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    fleet = Fleet(runner, args.procs)
    lrs = (pick_lrs(fleet, accounts, args.lr_accounts, LR_GRID) if args.lr_accounts
           else {m: {"lr": g[1]} for m, g in LR_GRID.items()})
    edge = [m for m, c in lrs.items() if args.lr_accounts and c["lr"] in (LR_GRID[m][0], LR_GRID[m][-1])]
    print(f"[{time.perf_counter() - t0:5.0f}s] learning rates picked"
          + (f" (at the grid's edge: {', '.join(edge)})" if edge else ""), flush=True)
    pairs = [(ds, acct, tr, ho) for ds, accts in accounts.items() for acct, (tr, ho) in accts.items()]
    jobs = [(p, m) for p in pairs for m in METHODS]
    results = fleet.run_many([(m, lrs[m]["lr"], tr, ho) for (_, _, tr, ho), m in jobs])
    by_pair = {}
    for (p, m), r in zip(jobs, results):
        by_pair.setdefault(p[:2], {})[m] = r
    methods = list(METHODS)
    if args.keep_top:
        print(f"[{time.perf_counter() - t0:5.0f}s] TS-LoRA again on the top {args.keep_top:.0%} modules", flush=True)
        kept = [top_names(by_pair[p[:2]]["ts-lora"]["modules"], args.keep_top) for p in pairs]
        tops = fleet.run_many([(TOP, lrs["ts-lora"]["lr"], tr, ho, k) for (_, _, tr, ho), k in zip(pairs, kept)])
        for p, k, r in zip(pairs, kept, tops):
            by_pair[p[:2]][TOP] = {**r, "kept_modules": len(k)}
        methods.append(TOP)
    rows = []
    for ds, acct, tr, ho in pairs:
        runs = by_pair[(ds, acct)]
        base_ppl = runs["lora"]["eval_ppl_before"]
        row = {"dataset": ds, "account": acct, "train_posts": len(tr), "eval_posts": len(ho), "base_ppl": base_ppl,
               "methods": {m: {"ppl": r["eval_ppl_after"], "gain": base_ppl - r["eval_ppl_after"],
                               **{k: v for k, v in r.items() if k not in ("eval_ppl_before", "eval_ppl_after")}}
                           for m, r in runs.items()}}
        rows.append(row)
        print(f"{ds}/{acct}: base {base_ppl:.1f} " + " ".join(
            f"{m} {x['ppl']:.1f}" + (f" (rate {x['eval_rate']:.2f})" if m in SELECTIVE else "")
            for m, x in row["methods"].items()), flush=True)
    summary = summarize(rows, methods)
    ts_cfg = {f: FinetuneConfig.model_fields[f].default if getattr(args, f) is None else getattr(args, f)
              for f in TS_FIELDS}
    s = summary["all"]
    result = {"ts_lora_activation_rate": s["ts-lora"]["eval_rate"][0],
              "ts_lora_gain_ratio_vs_lora": s["ratios"]["ts_lora_vs_lora"],
              "ts_dora_activation_rate": s["ts-dora"]["eval_rate"][0],
              "ts_dora_gain_ratio_vs_dora": s["ratios"]["ts_dora_vs_dora"],
              "paper": {"activation_rate": [0.4, 0.6], "gain_ratio_min": 1.0},
              "base": args.base, "pretrain": _pretrain_record(base),
              "device": torch.cuda.get_device_name(0) if runner.device.type == "cuda"
              else f"CPU: {platform.machine()}, {torch.get_num_threads()} threads",
              "config": {**vars(args), **ts_cfg},
              "learning_rates": lrs, "lr_at_grid_edge": edge, "summary": summary,
              "costs": {m: {k: statistics.fmean(r["methods"][m][k] for r in rows)
                            for k in ("trainable_params", "steps", "step_time_s")} for m in methods},
              "module_rates": {m: module_rates(rows, m) for m in methods if m in ("ts-lora", "ts-dora")},
              "accounts": [{**r, "methods": {m: {k: v for k, v in x.items() if k != "modules"}
                                             for m, x in r["methods"].items()}} for r in rows],
              "wall_s": time.perf_counter() - t0}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ts-peft-{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(summary, methods, ts_cfg["ts_target_rate"], stem + ".png",
         f"{args.base}, rank {args.rank}, {args.epochs} epochs: held-out ppl gain and token activation rate")
    print(" ".join(f"{k} {result[k]:.3f}" for k in list(result)[:4] if result[k] is not None)
          + f"; wrote {stem}.json [{result['wall_s']:.0f}s]", flush=True)
    return result


if __name__ == "__main__":
    main()
