"""Pretrain a small Llama-architecture base that knows the domain, from the tweet corpus alone.

Trains the byte-level BPE tokenizer and the model on `tweets-corpus.txt` (one post a line) and
saves one Hugging Face directory (model + tokenizer + pretrain.json), so the quality run
(pretrain, fine-tune, evaluate) needs no weights kept from an earlier run. Two sizes: `gpu`
(34M params, 4 epochs: ~70 s of training, ~90 s in all on one H100) and `cpu` (3.3M params,
2 min of training on 2 cores, well under one epoch). The directory is built beside `out` and
renamed into place at the end: a directory at `out` is always complete.

    python benchmarks/pretrain_base.py --corpus ../shared/data/tweets-corpus.txt --out runs/base --size cpu
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from tkllm_ray.data.tokenizer import train_tokenizer
from tkllm_ray.train.single import perplexity

# The cpu size also takes a smaller vocabulary: in a model this small the embedding and LM head
# dominate (8192 x 192 x 2 would be half the weights, and the softmax over 8192 half the FLOPs),
# and the few steps a CPU gets go further on a 4096-token table. The cost is ~11% more tokens a post.
# The corpus is small (~4M tokens) for 34M params: measured on an H100, validation loss bottoms out
# near 4-5 epochs and rises after (ppl 66 after 4 epochs with the cosine ending there, 73 after 3,
# 83 after 7), so the gpu size stops at 4 epochs (~70 s); `minutes` is only its safety net there.
# lr 2e-3 was worse on the GPU (75 vs 73 at 3 epochs); on the CPU 3e-3 beat 1e-3 (ppl 349 vs 407 at ~160 steps).
SIZES = {
    "gpu": dict(vocab=8192, hidden=512, layers=8, heads=8, intermediate=1408, batch=64, lr=1e-3,
                warmup=200, epochs=4, minutes=2.5, log_every=50, eval_every=250),
    "cpu": dict(vocab=4096, hidden=192, layers=4, heads=6, intermediate=512, batch=16, lr=3e-3,
                warmup=20, epochs=None, minutes=2.0, log_every=10, eval_every=0),
}
SEQ_LEN = 128
VAL_FRACTION = 0.01


def read_lines(corpus: str) -> tuple[list[str], list[str]]:
    """(train, val): the non-empty lines, the last ~1% held out (deterministic, no shuffle)."""
    with open(corpus, encoding="utf-8") as f:
        lines = [s for s in (line.strip() for line in f) if s]
    n_val = max(1, round(len(lines) * VAL_FRACTION))
    return lines[:-n_val], lines[-n_val:]


def to_rows(tok, lines: list[str]) -> torch.Tensor:
    """Each line closed by EOS, all concatenated and cut into rows of SEQ_LEN (the tail that does
    not fill a row is dropped: at most SEQ_LEN-1 tokens)."""
    enc = tok(lines, add_special_tokens=False)["input_ids"]  # batch encode: the Rust side, parallel
    stream = np.fromiter(itertools.chain.from_iterable(ids + [tok.eos_token_id] for ids in enc), dtype=np.int64)
    n = len(stream) // SEQ_LEN
    return torch.from_numpy(stream[: n * SEQ_LEN].reshape(n, SEQ_LEN))


def build_model(tok, s: dict, seed: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["heads"], intermediate_size=s["intermediate"],
        max_position_embeddings=2048,  # RoPE: no weights, so fine-tunes may use longer rows than SEQ_LEN
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device)


def lr_at(step: int, progress: float, s: dict) -> float:
    """Linear warmup over s['warmup'] steps, then cosine down to 10% of the peak. `progress` in
    [0, 1] is how much of the budget (steps or minutes, whichever runs out first) is spent."""
    if step < s["warmup"]:
        return s["lr"] * (step + 1) / s["warmup"]
    return s["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def pretrain_base(corpus: str, out_dir: str, size: str = "gpu", seed: int = 0, max_minutes: float | None = None,
                  steps: int | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Train tokenizer + base on `corpus`, save both into `out_dir`; returns what pretrain.json holds.
    Stops after `steps` (at most the size's epochs) or `max_minutes`, whichever comes first (the
    size's minutes if neither is given). The lr schedule runs over the steps when they are known,
    so the run is deterministic for `seed` on a device type unless the time limit cuts it short;
    with only a time budget it runs over the minutes, and the weights depend on the machine's speed."""
    t_start = time.perf_counter()
    s = dict(SIZES[size])
    if max_minutes is None and steps is None:
        max_minutes = s["minutes"]
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    from transformers import AutoTokenizer

    train_lines, val_lines = read_lines(corpus)
    t0 = time.perf_counter()
    train_tokenizer(train_lines, tmp, vocab_size=s["vocab"])  # the held-out lines are unseen by the BPE too
    tok = AutoTokenizer.from_pretrained(tmp)
    t_tok = time.perf_counter() - t0
    train_rows, val_rows = to_rows(tok, train_lines).to(dev), to_rows(tok, val_lines).to(dev)
    if s["epochs"]:
        epoch_steps = math.ceil(s["epochs"] * len(train_rows) / s["batch"])
        steps = min(steps or epoch_steps, epoch_steps)
    if steps:
        s["warmup"] = max(1, min(s["warmup"], steps // 10))

    model = build_model(tok, s, seed, dev)
    n_params = sum(p.numel() for p in model.parameters())
    # Decay matrices only: weight decay on RMSNorm gains pulls them towards 0, not towards 1.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=s["lr"], betas=(0.9, 0.95), fused=dev.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    eval_batch = s["batch"] * 2
    ppl_before = perplexity(model, val_rows, val_rows, eval_batch)

    gen = torch.Generator().manual_seed(seed)  # data order: a fresh permutation of the rows each epoch
    order, pos = torch.randperm(len(train_rows), generator=gen), 0
    curve, val_curve, window = [], [], torch.zeros((), device=dev)
    bar = tqdm(total=steps, disable=not progress, desc=f"pretrain {size}", unit="step")
    model.train()
    t_train, step = time.perf_counter(), 0
    while True:
        minutes_done = (time.perf_counter() - t_train) / 60 / max_minutes if max_minutes else 0.0
        if (steps and step >= steps) or minutes_done >= 1.0:
            break
        if pos + s["batch"] > len(order):
            order, pos = torch.randperm(len(train_rows), generator=gen), 0
        batch = train_rows[order[pos : pos + s["batch"]].to(dev)]
        pos += s["batch"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, step / steps if steps else minutes_done, s)
        with amp:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window += loss.detach()  # summed on the device: a .item() every step would sync the GPU
        step += 1
        bar.update(1)
        if step % s["log_every"] == 0:
            avg = float(window) / s["log_every"]
            window.zero_()
            curve.append([step, round(avg, 4)])
            bar.set_postfix(loss=f"{avg:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        if s["eval_every"] and step % s["eval_every"] == 0:  # cheap on a GPU, seconds each on a CPU
            val_curve.append([step, round(math.log(perplexity(model, val_rows, val_rows, eval_batch)), 4)])
            model.train()
    bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_train
    ppl_after = perplexity(model, val_rows, val_rows, eval_batch)

    model.save_pretrained(tmp, safe_serialization=True)  # tokenizer files are in tmp already
    tokens = step * s["batch"] * SEQ_LEN
    import transformers

    result = {
        "size": size, "seed": seed, "corpus": os.path.abspath(corpus),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
        else f"CPU: {platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": {k: s[k] for k in ("hidden", "layers", "heads", "intermediate")} | {"params": n_params},
        "vocab_size": len(tok), "seq_len": SEQ_LEN, "batch_size": s["batch"], "lr": s["lr"], "warmup": s["warmup"],
        "train_lines": len(train_lines), "val_lines": len(val_lines), "train_tokens": train_rows.numel(),
        "val_tokens": val_rows.numel(), "max_steps": steps, "max_epochs": s["epochs"], "max_minutes": max_minutes,
        "steps": step, "tokens_seen": tokens, "epochs": round(tokens / train_rows.numel(), 3),
        "tokenizer_s": round(t_tok, 2), "train_s": round(train_s, 2), "tokens_per_s": round(tokens / train_s),
        "val_loss_before": round(math.log(ppl_before), 4), "val_loss_after": round(math.log(ppl_after), 4),
        "val_ppl_before": round(ppl_before, 2), "val_ppl_after": round(ppl_after, 2),
        "loss_curve": curve, "loss_curve_every": s["log_every"], "val_loss_curve": val_curve,
    }
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(result, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.rename(tmp, out_dir)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=os.path.join("..", "shared", "data", "tweets-corpus.txt"))
    ap.add_argument("--out", default=os.path.join("runs", "base"))
    ap.add_argument("--size", choices=sorted(SIZES), default="gpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="training time budget (default: the size's)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    r = pretrain_base(a.corpus, a.out, a.size, a.seed, a.max_minutes, a.steps, a.device)
    print(f"{r['model']['params'] / 1e6:.2f}M params, vocab {r['vocab_size']}, {r['steps']} steps "
          f"({r['epochs']} epochs) in {r['train_s']} s = {r['tokens_per_s']} tokens/s on {r['device']}")
    print(f"val ppl {r['val_ppl_before']} -> {r['val_ppl_after']}; wall {r['wall_s']} s; wrote {a.out}")


if __name__ == "__main__":
    main()
