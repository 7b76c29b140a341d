"""Fine-tune one account's model (GSPF, full, LoRA, DoRA, Adapter, DiffPruning, TS-LoRA or TS-DoRA)
from an ingested dataset.

The step is the reusable piece (`GSPF.step`, `DiffPruning.step`, `DenseTrainer.step`, all one
`optimizer_step`); this module wires data, eval, cost reporting and publishing around it for one
account, in one training loop for every method. The packed multi-tenant engine (train/packed.py)
follows the same per-account event schedule (train/schedule.py).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.data.tokenizer import load_tokenizer
from tkllm_ray.models import fingerprint
from tkllm_ray.models.load import load_base_model
from tkllm_ray.sparse.delta_store import Delta, decode, encode, save_delta
from tkllm_ray.sparse.gspf import GSPF, GSPFSettings
from tkllm_ray.sparse.model import AppliedDelta, detach
from tkllm_ray.sparse.placement import heatmap_png, placement_table
from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.storage import join, new_version_id, write_dir
from tkllm_ray.train.baselines import Adapter, DenseTrainer
from tkllm_ray.train.data import account_posts, pack
from tkllm_ray.train.schedule import events, total_steps
from tkllm_ray.train.diffpruning import DiffPruning, DiffPruningSettings
from tkllm_ray.train import ts_peft
from tkllm_ray.train.ts_artifacts import publish_ts
from tkllm_ray.train.ts_peft import TSTrainer

SPARSE_METHODS = ("gspf", "diffpruning")  # published as sparse deltas; the others as model/adapter directories


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_finetune(cfg: FinetuneConfig, progress: bool = True) -> dict:
    """`tkllm finetune`: the account's posts from the ingested dataset, the base, training, publishing."""
    device = _device(cfg.device)
    tok = load_tokenizer(cfg.tokenizer, cfg.storage)
    train = account_posts(cfg.data, cfg.account, "train", cfg.storage)
    held_out = account_posts(cfg.data, cfg.account, "eval", cfg.storage)
    model = load_base_model(cfg.model, len(tok), cfg.seed, device, cfg.storage, cfg.tokenizer)
    run = train_account(cfg, model, tok.eos_token_id, train, held_out, progress)
    return publish_run(cfg, run)


@dataclass
class AccountRun:
    """What `train_account` leaves: metrics, the trained model (sparse methods: base + shipped
    delta applied), and what publishing needs."""
    result: dict
    model: torch.nn.Module
    base_fingerprint: str
    shapes: dict
    delta: Delta | None = None
    adapter: Adapter | None = None
    trainer: object = None


def train_account(cfg: FinetuneConfig, model, eos_id: int, train_posts: list[list[int]],
                  eval_posts: list[list[int]], progress: bool = True) -> AccountRun:
    """One account, one method, on a base already loaded on its device (which it modifies: pass a
    copy to reuse the base). Held-out perplexity before and after, costs, the delta or model."""
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    train_ids, train_labels = (t.to(device) for t in pack(train_posts, eos_id, cfg.seq_len))
    eval_ids, eval_labels = (t.to(device) for t in pack(eval_posts, eos_id, cfg.seq_len))
    base_fp = fingerprint(model)
    ppl_before = perplexity(model, eval_ids, eval_labels, cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    shapes = {n: lin.weight.shape for n, lin in target_linears(model, cfg.target_modules).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the peak reported covers the method's setup and training
    adapter = Adapter(model, cfg.adapter_bottleneck) if cfg.method == "adapter" else None
    model, trainer = _trainer(cfg, model)
    steps = total_steps(cfg, train_ids.shape[0])
    last_epoch = steps - -(-train_ids.shape[0] // cfg.batch_size)  # the last epoch's first step
    bar = tqdm(total=steps, desc=f"{cfg.account} [{cfg.method}]", disable=not progress)
    losses, times, t0 = [], [], time.perf_counter()
    for kind, payload in events(cfg, train_ids, train_labels, gen):
        if kind == "step" and isinstance(trainer, TSTrainer) and len(losses) == last_epoch:
            trainer.report()  # reset: the training rates reported cover the last epoch
        if kind == "select":
            trainer.sensitivity_select(payload)
        elif kind == "fixed_mask":
            gated = train_costs(trainer.opt, times, device)  # the dense gated phase is the costly one
            trainer = _fixed_mask(cfg, model, trainer)
        else:
            t = time.perf_counter()
            losses.append(trainer.step(payload))  # float(loss) waits for the device: this times the whole step
            times.append(time.perf_counter() - t)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    costs = {"train_time_s": time.perf_counter() - t0, **train_costs(trainer.opt, times, device)}
    if cfg.method == "diffpruning" and cfg.diffpruning_mask_epochs:
        costs.update({k: gated[k] for k in ("trainable_params", "train_state_bytes")})
    delta = _ship(model, trainer) if cfg.method in SPARSE_METHODS else None
    selective = {"train": trainer.report()} if isinstance(trainer, TSTrainer) else None  # the last epoch
    ppl_after = perplexity(model, eval_ids, eval_labels, cfg.batch_size)  # token-selective: gated inference
    metrics = {"eval_ppl_before": ppl_before, "eval_ppl_after": ppl_after, "train_loss_last": losses[-1],
               "steps": len(losses), **costs, "train_tokens": int((train_labels != -100).sum()) * cfg.epochs}
    result = {"account": cfg.account, "method": cfg.method, "device": str(device), **metrics}
    if cfg.method == "gspf":
        result["reselection"] = trainer.state.history
    if selective is not None:
        selective["eval"] = trainer.report()
        result["token_selective"] = selective
    return AccountRun(result, model, base_fp, shapes, delta, adapter, trainer)


def publish_run(cfg: FinetuneConfig, run: AccountRun, run_id: str | None = None,
                data_watermark: str | None = None) -> dict:
    """Sparse methods: a delta version (+ placement table and heatmap); Adapter: its directory;
    full FT: a standalone HF directory; LoRA: the peft adapter directory; DoRA and the token-selective
    methods: an adapters version in the delta store (`publish_ts`)."""
    result = dict(run.result)
    metrics = {k: v for k, v in result.items() if k not in ("account", "method", "device", "reselection",
                                                            "token_selective")}
    if run.delta is not None:
        table = placement_table({n: i for n, (i, _) in run.delta.items()}, run.shapes)
        plot = heatmap_png(table, f"{cfg.method} delta, {cfg.account}, density {cfg.density:.2%}")
        result["placement"] = table
        result["version"] = save_delta(
            cfg.output, cfg.account, run.delta, cfg.model, run.base_fingerprint, cfg.method, cfg.density,
            metrics=metrics, extra_files={"placement.json": json.dumps(table).encode(), "placement.png": plot},
            run_id=run_id, options=cfg.storage, data_watermark=data_watermark)
        result["delta_uri"] = join(cfg.output, cfg.account, result["version"])
    elif isinstance(run.trainer, TSTrainer):
        result["version"] = publish_ts(run.trainer.modules, cfg, run.base_fingerprint, _json_safe(metrics), run_id,
                                       data_watermark)
        result["model_uri"] = join(cfg.output, cfg.account, result["version"])
    elif run.adapter is not None:
        result["model_uri"] = run.adapter.save(join(cfg.output, cfg.account, "adapter", new_version_id()),
                                               cfg.model, run.base_fingerprint, cfg.storage)
    else:
        result["model_uri"] = _save_model(run.model, cfg)
    return result


def _json_safe(metrics: dict) -> dict:
    """The numbers of a result that go into a manifest (curves and tables stay in the result)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _trainer(cfg: FinetuneConfig, model):
    """The method's model and trainer (`.step(batch) -> loss`, `.opt`); adapters are already inserted;
    GSPF selects at its first event."""
    if cfg.method == "gspf":
        trainer = GSPF(model, lm_loss, GSPFSettings(density=cfg.density, scope=cfg.scope,
                                                     target_modules=cfg.target_modules, top_layers=cfg.top_layers,
                                                     offload_sensitivity=cfg.sensitivity_offload,
                                                     lr=cfg.lr, weight_decay=cfg.weight_decay))
        return model, trainer
    if cfg.method == "diffpruning":
        return model, DiffPruning(model, lm_loss, DiffPruningSettings(
            density=cfg.density, target_modules=cfg.target_modules, lr=cfg.lr, weight_decay=cfg.weight_decay,
            l0=cfg.diffpruning_l0, alpha_init=cfg.diffpruning_alpha_init))
    if cfg.method in ts_peft.KINDS or cfg.method == "dora":
        # DoRA: TS-DoRA with its gate held open (τ = 0, never updated, no penalty), which is exactly DoRA
        kind = "ts-dora" if cfg.method == "dora" else cfg.method
        mods = ts_peft.attach(model, kind, target_linears(model, cfg.target_modules), cfg.lora_rank,
                              bandwidth=cfg.ts_bandwidth)
        return model, TSTrainer(model, mods, lm_loss, cfg.lr, cfg.weight_decay, cfg.ts_target_rate, cfg.ts_penalty,
                                cfg.ts_tau_lr, learn_tau=cfg.method != "dora")
    if cfg.method == "lora":
        model = _wrap_lora(model, cfg)
    return model, DenseTrainer(model, lm_loss, cfg.lr, cfg.weight_decay)


def train_costs(opt: torch.optim.Optimizer, step_times: list[float], device: torch.device) -> dict:
    """What a method cost. `step_time_s`: mean seconds per step, leaving out the first (warm-up:
    allocator growth, lazy init, kernel compilation) when there are two or more; GSPF re-selection
    runs between steps, so it is in `train_time_s` only. `peak_memory_bytes`: the CUDA allocator's
    peak from the method's setup to the end of training, the resident base and eval data included
    (None on CPU: not measured). `train_state_bytes`: the trainable parameters, their gradients and
    the optimizer state, read from the tensors after training."""
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    state = [t for p in params for t in opt.state.get(p, {}).values() if torch.is_tensor(t)]
    timed = step_times[1:] if len(step_times) >= 2 else step_times
    return {"trainable_params": sum(p.numel() for p in params), "step_time_s": sum(timed) / len(timed),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "train_state_bytes": sum(t.numel() * t.element_size() for t in params + grads + state)}


def _fixed_mask(cfg: FinetuneConfig, model, trainer: DiffPruning) -> GSPF:
    """DiffPruning's last phase (Guo et al.): project to the budget, then train the kept entries
    on that fixed mask with the sparse trainer GSPF uses."""
    delta = trainer.export()
    trainer.remove()
    return GSPF.from_delta(model, lm_loss, delta, GSPFSettings(density=cfg.density, lr=cfg.lr,
                                                              weight_decay=cfg.weight_decay))


def _ship(model, trainer) -> Delta:
    """A sparse method's delta: take the trainer's modules out and apply the delta to the base as it is
    published (values in the store's dtype), so the eval after is the shipped model's, not the trained one."""
    delta = trainer.export()
    if isinstance(trainer, GSPF):
        detach(model)
    else:
        trainer.remove()
    AppliedDelta(model, decode(encode(delta)))  # the model is only evaluated after this: no restore
    return delta


def _wrap_lora(model, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    # GSPF's targets (all linears, a tied head excluded), as peft module-name suffixes.
    targets = sorted({n.rsplit(".", 1)[-1] for n in target_linears(model, cfg.target_modules)})
    return get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))


def _save_model(model, cfg: FinetuneConfig) -> str:
    """Full FT -> a standalone HF directory; LoRA -> the peft adapter directory. A new directory
    per run (a version id), appearing whole."""
    target = join(cfg.output, cfg.account, cfg.method, new_version_id())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        write_dir(d, target, cfg.storage, last=("config.json", "adapter_config.json"))
    return target
