"""One account's fine-tune the way a user runs it today: load the base from local disk, wrap it in
peft LoRA (r16, every linear), train with transformers' Trainer, save the adapter. The baseline
`packed_bench.py` compares against, in its process (`train_one`) or as a job of its own:

    python benchmarks/peft_job.py --base DIR --posts POSTS.json --out DIR [--epochs 3 --batch 24]

(a fresh Python process per account: imports, CUDA start-up and the base load each time, as a
job per account pays them).
"""

from __future__ import annotations

import argparse
import json
import os

import torch


def train_one(base_dir: str, posts: list[list[int]], out_dir: str, epochs: int, batch: int,
              dtype: torch.dtype, device: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    ds = [{"input_ids": p + [0], "labels": p + [0]} for p in posts]  # a caption + EOS a row
    targs = TrainingArguments(output_dir=os.path.join(out_dir, "run"), num_train_epochs=epochs,
                              per_device_train_batch_size=batch, learning_rate=1e-3, logging_strategy="no",
                              save_strategy="no", report_to=[], bf16=dtype == torch.bfloat16,
                              use_cpu=device == "cpu", disable_tqdm=True)
    Trainer(model=model, args=targs, train_dataset=ds).train()
    model.save_pretrained(out_dir)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the base model's directory (save_pretrained)")
    ap.add_argument("--posts", required=True, help="a JSON list of captions, each a list of token ids")
    ap.add_argument("--out", required=True, help="where the adapter goes")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=24)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    with open(args.posts) as f:
        posts = json.load(f)
    train_one(args.base, posts, args.out, args.epochs, args.batch, torch.bfloat16 if cuda else torch.float32,
              "cuda" if cuda else "cpu")


if __name__ == "__main__":
    main()
