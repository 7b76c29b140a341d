"""Fine-tune one account's model (GSPF, full, or LoRA) from an ingested dataset.

The step is the reusable piece (`GSPF.step`, `dense_step`); this module wires data, eval and
publishing around it for one account. The packed multi-tenant engine reuses the same steps.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import torch
from tqdm import tqdm

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.data.tokenizer import load_tokenizer
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.models.presets import PRESETS
from tkllm_ray.sparse.delta_store import save_delta
from tkllm_ray.sparse.gspf import GSPF, GSPFSettings
from tkllm_ray.sparse.placement import heatmap_png, placement_table
from tkllm_ray.storage import join, write_bytes
from tkllm_ray.train.data import account_posts, pack


def lm_loss(model, batch) -> torch.Tensor:
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for s in range(0, ids.shape[0], batch_size):
        lab = labels[s : s + batch_size]
        n = int((lab[:, 1:] != -100).sum())  # HF shifts labels by one inside the loss
        if n:
            total += float(lm_loss(model, (ids[s : s + batch_size], lab))) * n
            count += n
    return math.exp(total / max(count, 1))


def load_base(cfg: FinetuneConfig, vocab_size: int, device: torch.device):
    if cfg.model in PRESETS:
        return build_model(cfg.model, vocab_size=vocab_size, seed=cfg.seed).to(device)
    from transformers import AutoModelForCausalLM

    from tkllm_ray.storage.cache import local_dir

    path = local_dir(cfg.model, "model directory", cfg.storage)  # an s3:// prefix is cached locally
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32).to(device)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(ids, labels, batch_size, gen):
    order = torch.randperm(ids.shape[0], generator=gen)
    for s in range(0, len(order), batch_size):
        sel = order[s : s + batch_size]
        yield ids[sel], labels[sel]


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    tok = load_tokenizer(cfg.tokenizer, cfg.storage)
    train_ids, train_labels = pack(account_posts(cfg.data, cfg.account, "train", cfg.storage), tok.eos_token_id, cfg.seq_len)
    eval_ids, eval_labels = pack(account_posts(cfg.data, cfg.account, "eval", cfg.storage), tok.eos_token_id, cfg.seq_len)
    train_ids, train_labels, eval_ids, eval_labels = (t.to(device) for t in (train_ids, train_labels, eval_ids, eval_labels))
    model = load_base(cfg, len(tok), device)
    base_fp = fingerprint(model)
    ppl_before = perplexity(model, eval_ids, eval_labels, cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)

    def warm_batches():  # the sensitivity warm-up: warmup_steps batches, cycling if the data is short
        return [b for _, b in zip(range(cfg.warmup_steps), _cycle(train_ids, train_labels, cfg.batch_size, gen))]

    if cfg.method == "gspf":
        trainer = GSPF(model, lm_loss, GSPFSettings(density=cfg.density, scope=cfg.scope,
                                                     target_modules=cfg.target_modules, lr=cfg.lr,
                                                     weight_decay=cfg.weight_decay))
        trainer.sensitivity_select(warm_batches())
        step = trainer.step
        trainable = sum(m.values.numel() for m in trainer.modules.values())
    else:
        if cfg.method == "lora":
            model = _wrap_lora(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        trainable = sum(p.numel() for p in params)

        def step(batch):
            model.train()
            loss = lm_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

    steps_per_epoch = -(-train_ids.shape[0] // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=f"{cfg.account} [{cfg.method}]", disable=not progress)
    losses, t0 = [], time.perf_counter()
    for epoch in range(cfg.epochs):
        if cfg.method == "gspf" and cfg.reselect_every and epoch and epoch % cfg.reselect_every == 0:
            trainer.sensitivity_select(warm_batches())
        for batch in _batches(train_ids, train_labels, cfg.batch_size, gen):
            losses.append(step(batch))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_s = time.perf_counter() - t0
    ppl_after = perplexity(model, eval_ids, eval_labels, cfg.batch_size)
    metrics = {"eval_ppl_before": ppl_before, "eval_ppl_after": ppl_after, "train_loss_last": losses[-1],
               "steps": len(losses), "step_time_s": train_s / len(losses), "trainable_params": trainable,
               "train_tokens": int((train_labels != -100).sum()) * cfg.epochs}
    result = {"account": cfg.account, "method": cfg.method, "device": str(device), **metrics}
    if cfg.method == "gspf":
        table = placement_table({n: m.indices for n, m in trainer.modules.items()},
                                {n: lin.weight.shape for n, lin in trainer._linears().items()})
        plot = heatmap_png(table, f"GSPF selection, {cfg.account}, density {cfg.density:.2%}")
        result["placement"] = table
        result["version"] = save_delta(
            cfg.output, cfg.account, trainer.export(), cfg.model, base_fp, "gspf", cfg.density, metrics=metrics,
            extra_files={"placement.json": json.dumps(table).encode(), "placement.png": plot}, options=cfg.storage)
        result["reselection"] = trainer.s.history
        result["delta_uri"] = join(cfg.output, cfg.account, result["version"])
    else:
        result["model_uri"] = _save_model(model, cfg)
    return result


def _cycle(ids, labels, batch_size, gen):
    while True:
        yield from _batches(ids, labels, batch_size, gen)


def _wrap_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    targets = [t for t in leaves if not cfg.target_modules or any(k in t for k in cfg.target_modules)]
    return get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))


def _save_model(model, cfg: FinetuneConfig) -> str:
    """Full FT -> a standalone HF directory; LoRA -> the peft adapter directory."""
    target = join(cfg.output, cfg.account, cfg.method)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                write_bytes(join(target, name), f.read(), cfg.storage)
    return target
