"""GSPF vs full fine-tuning vs LoRA on one GPU: step time and peak memory, same model, same batch.

    python benchmarks/gspf_bench.py --out benchmarks/results      # tkllm-s (≈1.3B), bf16, seq 512

Each method starts from a fresh base (same seed) on an emptied allocator; peak memory is
torch.cuda.max_memory_allocated over the timed training steps (weights included). GSPF's one-off
sensitivity warm-up is timed and measured apart, since it runs once per fine-tune, not per step.
A kernel section checks the Triton SDDMM against the torch reference on a real layer shape and
times it next to the dense dW GEMM that it replaces. Writes gspf-bench-<gpu>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from tkllm_ray.models import build_model
from tkllm_ray.models.presets import PRESETS
from tkllm_ray.sparse.delta_op import sampled_grad_reference
from tkllm_ray.sparse.gspf import GSPF, GSPFSettings
from tkllm_ray.sparse.selection import layer_of
from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.train.baselines import DenseTrainer
from tkllm_ray.train.single import lm_loss
from results_io import write_result  # sibling module: this script's folder is on sys.path

GIB = 2**30


def _fresh(args):
    gc.collect()
    torch.cuda.empty_cache()
    model = build_model(args.model, vocab_size=args.vocab, seed=0, dtype=torch.bfloat16, device="cuda")
    model.config._attn_implementation = "sdpa"
    return model


def _timed(step, batch, args) -> dict:
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses = [step(batch) for _ in range(args.steps)]
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    return {"step_time_s": dt, "tokens_per_s": batch[0].numel() / dt, "peak_memory_gib": torch.cuda.max_memory_allocated() / GIB,
            "loss_first": losses[0], "loss_last": losses[-1]}


def bench_full(args, batch):
    model = _fresh(args)
    trainer = DenseTrainer(model, lm_loss, lr=1e-5)
    out = _timed(trainer.step, batch, args)
    return {**out, "trainable_params": sum(p.numel() for p in model.parameters())}


def bench_lora(args, batch, adapter_fp32):
    """peft LoRA on every linear but the head. peft's default keeps adapter weights in fp32 on a
    bf16 base (`autocast_adapter_dtype`); `adapter_fp32=False` keeps them bf16 (faster, leaner)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_fresh(args), LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM"),
                           autocast_adapter_dtype=adapter_fp32)
    trainer = DenseTrainer(model, lm_loss, lr=1e-5)  # AdamW over what peft left trainable
    out = _timed(trainer.step, batch, args)
    return {**out, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def bench_gspf(args, batch, top_layers=None, last_blocks=None):
    """GSPF at args.density of all linear weights. `top_layers`: the budget confined to the layers
    the selection favours; `last_blocks`: confined to the final N blocks + head (the placement
    the paper reports), the same k entries either way."""
    model = _fresh(args)
    density, targets = args.density, None
    if last_blocks:
        n = model.config.num_hidden_layers
        targets = [f"layers.{i}." for i in range(n - last_blocks, n)] + ["lm_head"]
        everything = sum(m.weight.numel() for m in target_linears(model).values())
        density = args.density * everything / sum(m.weight.numel() for m in target_linears(model, targets).values())
    trainer = GSPF(model, lm_loss, GSPFSettings(density=density, top_layers=top_layers, target_modules=targets, lr=1e-4))
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    sel = trainer.sensitivity_select([batch] * args.sensitivity_steps)
    torch.cuda.synchronize()
    warm = {"sensitivity_s": time.perf_counter() - t0, "sensitivity_peak_gib": torch.cuda.max_memory_allocated() / GIB}
    gc.collect()
    torch.cuda.empty_cache()
    out = _timed(trainer.step, batch, args)
    layers = sorted({layer_of(n) for n, i in sel.indices.items() if i.numel()} - {None})
    return {**out, **warm, "trainable_params": sel.k, "selected_layers": layers,
            "lowest_layer": min(layers) if layers else None,
            "per_module_type": _by_type(sel.indices)}


def _by_type(indices) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, idx in indices.items():
        kind = name.rsplit(".", 1)[-1]
        out[kind] = out.get(kind, 0) + int(idx.numel())
    return out


def bench_kernel(args) -> dict:
    """One MLP down_proj-shaped layer at the benchmark's token count."""
    from tkllm_ray.sparse.sddmm_triton import sampled_grad_triton

    cfg = PRESETS[args.model]
    din, dout, tokens = cfg["intermediate_size"], cfg["hidden_size"], args.batch * args.seq
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, din, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(tokens, dout, device="cuda", dtype=torch.bfloat16, generator=g)
    k = max(1, round(args.density * din * dout))
    idx = torch.sort(torch.randperm(din * dout, device="cuda", generator=g)[:k]).values
    rows, cols = (idx // din).to(torch.int32), (idx % din).to(torch.int32)
    ref = sampled_grad_reference(dy, x, rows.long(), cols.long())

    def timeit(fn, n=20):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    configs = {}
    for be, bt, tp, w in [(64, 64, 512, 4), (64, 64, 512, 8), (32, 128, 1024, 4), (32, 128, 1024, 8),
                          (16, 256, 1024, 4), (128, 32, 512, 8), (64, 128, 2048, 8), (8, 512, 2048, 4)]:
        kw = dict(block_e=be, block_t=bt, tok_per_prog=tp, num_warps=w)
        got = sampled_grad_triton(dy, x, rows, cols, **kw)
        err = float((got - ref).abs().max() / ref.abs().max())
        configs[f"e{be}_t{bt}_p{tp}_w{w}"] = {"ms": 1e3 * timeit(lambda: sampled_grad_triton(dy, x, rows, cols, **kw)),
                                             "max_rel_err": err}
    # The two transposes alone (part of every config above), and torch's own strided copy.
    from tkllm_ray.sparse.sddmm_triton import transpose

    transposes_ms = 1e3 * timeit(lambda: (transpose(dy), transpose(x)))
    torch_transposes_ms = 1e3 * timeit(lambda: (dy.t().contiguous(), x.t().contiguous()))
    return {"shape": {"tokens": tokens, "in": din, "out": dout, "entries": k}, "triton": configs,
            "torch_reference_ms": 1e3 * timeit(lambda: sampled_grad_reference(dy, x, rows.long(), cols.long()), 5),
            "dense_dW_gemm_ms": 1e3 * timeit(lambda: dy.t() @ x), "transposes_ms": transposes_ms,
            "torch_transposes_ms": torch_transposes_ms}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tkllm-s")
    ap.add_argument("--vocab", type=int, default=32000, help="32000: the ≈1.35B of the reference figures")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.003)
    ap.add_argument("--top-layers", type=int, default=4)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--sensitivity-steps", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(RUNS))
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gspf_bench needs a CUDA GPU")
    ids = torch.randint(2, args.vocab, (args.batch, args.seq), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    batch = (ids, ids)  # (input_ids, labels), as every training step in the project takes it
    results = {}
    for name in args.methods:
        t0 = time.perf_counter()
        try:
            results[name] = RUNS[name](args, batch)
        except torch.cuda.OutOfMemoryError as e:
            results[name] = {"error": f"out of memory: {e}"[:300]}
        print(f"[{time.perf_counter() - t0:6.1f}s] {name}: {json.dumps(results[name])[:400]}", flush=True)
    gpu = torch.cuda.get_device_name(0)
    out = {"gpu": gpu, "torch": torch.__version__, "config": vars(args), **_ratios(results), "methods": results}
    write_result(args.out, "gspf-bench", gpu, out)
    return out


RUNS = {
    "kernel": lambda args, batch: bench_kernel(args),
    "full": bench_full,
    "lora": lambda args, batch: bench_lora(args, batch, adapter_fp32=False),
    "lora_peft_default": lambda args, batch: bench_lora(args, batch, adapter_fp32=True),
    "gspf": bench_gspf,
    "gspf_top_sensitivity_layers": lambda args, batch: bench_gspf(args, batch, top_layers=args.top_layers),
    "gspf_last_blocks": lambda args, batch: bench_gspf(args, batch, last_blocks=args.top_layers),
}


def _ratios(r: dict) -> dict:
    def ratio(a, b, key):
        ok = all(m in r and key in r[m] for m in (a, b))
        return r[a][key] / r[b][key] if ok else None

    def four(gspf):
        return {"memory_ratio_vs_full": ratio(gspf, "full", "peak_memory_gib"),
                "step_time_ratio_vs_full": ratio(gspf, "full", "step_time_s"),
                "memory_ratio_vs_lora": ratio(gspf, "lora", "peak_memory_gib"),
                "step_time_ratio_vs_lora": ratio(gspf, "lora", "step_time_s")}

    # Headline: restricted GSPF (final blocks + head) against full FT and bf16 LoRA r16.
    return {**four("gspf_last_blocks"), "headline_variant": "gspf_last_blocks",
            "by_variant": {v: four(v) for v in ("gspf", "gspf_top_sensitivity_layers", "gspf_last_blocks")}}


if __name__ == "__main__":
    main()
