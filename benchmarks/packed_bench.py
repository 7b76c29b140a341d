"""Packed multi-account GSPF vs one account at a time vs one HF Trainer + peft LoRA job per account,
on one device, same synthetic accounts (issue 4's benchmark).

    python benchmarks/packed_bench.py                              # H100: tkllm-s bf16, 1,000 accounts
    python benchmarks/packed_bench.py --model tkllm-tiny --accounts 12 --seconds 20 --hf-accounts 2   # CPU smoke

Each account: `--captions` captions of `--tokens` random token ids, `--epochs` epochs, GSPF at
`--density`. Every mode runs for at most `--seconds` of wall time (a command has 10 minutes);
accounts/hour comes from the accounts finished in that time (and, as a cross-check, from the
tokens trained). MFU counts 4·N FLOPs per trained token (forward 2N + input-gradient 2N through
the whole stack; GSPF's sampled weight gradient is ~0.3% of a dense one) against the device's
dense bf16 peak. Writes packed-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.models import build_model
from tkllm_ray.train.packed import AccountJob, PackedGSPF

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


def run_engine(args, base, jobs, max_resident: int, budget: int | None) -> dict:
    """The packed engine (max_resident=1: one account at a time, model loaded once) for <= seconds."""
    engine = PackedGSPF(base, max_resident=max_resident, max_rows=args.max_rows, state_budget=budget)
    done, tokens = [], [0]
    t0 = time.perf_counter()

    def stop(eng, picked):
        tokens[0] += sum(int((b[1] != -100).sum()) for _, b in picked)
        if time.perf_counter() - t0 > args.seconds:
            raise TimeoutError

    engine.on_step = stop
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        engine.run(jobs, 0, lambda u, d: done.append(u.account))
    except TimeoutError:
        pass
    wall = time.perf_counter() - t0
    per_account = args.captions * (args.tokens + 1) * args.epochs  # +1: the EOS closing each caption
    out = {"accounts_done": len(done), "wall_s": wall, "accounts_per_hour": 3600 * len(done) / wall,
           "train_tokens_per_s": tokens[0] / wall, "accounts_per_hour_by_tokens": 3600 * tokens[0] / wall / per_account,
           "max_resident_accounts": engine.stats["max_resident"], **engine.stats}
    if torch.cuda.is_available():
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    for name, mod in list(base.named_modules()):  # hand the plain base back for the next mode
        if type(mod).__name__ == "PackedLinear":
            parent, _, leaf = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, leaf, mod.base)
    return out


def run_hf_peft(args, base, n: int) -> dict:
    """What a user does today: per account, load the base from local disk, wrap it in peft LoRA,
    train with transformers.Trainer, save the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    dtype = next(base.parameters()).dtype
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(os.path.join(d, "base"))
        t0, done = time.perf_counter(), 0
        for job in make_jobs(args, n, offset=10_000):
            model = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=dtype).to(base.device)
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
            ds = [{"input_ids": p + [0], "labels": p + [0]} for p in job.train_posts]  # a caption + EOS a row
            targs = TrainingArguments(output_dir=os.path.join(d, "run"), num_train_epochs=args.epochs,
                                      per_device_train_batch_size=args.batch_size * args.seq_len // (args.tokens + 1),
                                      learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to=[],
                                      bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available())
            Trainer(model=model, args=targs, train_dataset=ds).train()
            model.save_pretrained(os.path.join(d, "adapters", job.cfg.account))
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
    ap.add_argument("--max-rows", type=int, default=256)
    ap.add_argument("--max-resident", type=int, default=1000)
    ap.add_argument("--state-gb", type=float, default=None, help="state budget (default: 60%% of free GPU memory)")
    ap.add_argument("--seconds", type=float, default=150, help="wall budget per mode")
    ap.add_argument("--hf-accounts", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["packed", "unpacked", "hf_peft"])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    base = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=torch.bfloat16 if cuda else torch.float32,
                       device=dev)
    n_params = sum(p.numel() for p in base.parameters())
    budget = None
    if cuda:
        free, _ = torch.cuda.mem_get_info()
        budget = int(args.state_gb * 2**30) if args.state_gb else int(0.6 * free)
    results = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        if mode == "hf_peft":
            results[mode] = run_hf_peft(args, base, args.hf_accounts)
        else:
            jobs = make_jobs(args, args.accounts)
            results[mode] = run_engine(args, base, jobs, args.max_resident if mode == "packed" else 1, budget)
        print(f"[{time.perf_counter() - t0:5.0f}s] {mode}: {json.dumps(results[mode])[:300]}", flush=True)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    packed = results.get("packed", {})
    out = {"device": name, "config": vars(args), "params": n_params,
           "accounts_per_hour": packed.get("accounts_per_hour"),
           "speedup_vs_hf_peft": _ratio(packed, results.get("hf_peft")),
           "speedup_vs_unpacked": _ratio(packed, results.get("unpacked")),
           "max_resident_accounts": packed.get("max_resident_accounts"),
           "mfu": packed["train_tokens_per_s"] * 4 * n_params / (peak * 1e12) if peak and packed else None,
           "modes": results}
    os.makedirs(args.out, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    with open(os.path.join(args.out, f"packed-{slug}.json"), "w") as f:
        json.dump(out, f, indent=2)
    return out


def _ratio(a: dict | None, b: dict | None):
    if not a or not b or not b.get("accounts_per_hour"):
        return None
    return a["accounts_per_hour"] / b["accounts_per_hour"]


if __name__ == "__main__":
    main()
