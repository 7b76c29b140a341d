"""Packed token-selective fine-tunes (TS-LoRA, TS-DoRA, and DoRA as TS-DoRA with the gate held open):
one resident base, many accounts' adapters, micro-batches that mix accounts.

Each target linear becomes a `TSRouter`: the batch's rows are grouped by account, and each group
goes through its own account's adapter (a `ts_peft` module over the shared frozen linear), gate,
threshold and counts included. Every account follows the event schedule of the single-account
path (train/schedule.py, same seed: same batches in the same order), its adapters are initialised
from the same seed in the same module order, its loss is its own batch mean plus its own rate
penalty, and it steps its own AdamW and τ optimizer. Packing changes the throughput, not the math:
an account's adapters equal the ones it gets alone up to float rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.train import ts_peft
from tkllm_ray.train.baselines import Insertion
from tkllm_ray.train.data import pack
from tkllm_ray.train.schedule import events, total_steps

METHODS = ("ts-lora", "ts-dora", "dora")


class TSRouter(nn.Module):
    """A frozen linear shared by many accounts' token-selective adapters. `plan` lists (account,
    first row, end row) covering the current batch's rows in order (end None: to the last row);
    an empty plan gets the base alone. The adapters are kept out of the module tree: the model's
    parameters, fingerprint and train/eval switches stay the base's."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.adapters: dict[str, ts_peft.TSAdapterLinear] = {}
        self.plan: list[tuple[str, int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.plan:
            return self.base(x)
        return torch.cat([self.adapters[a](x[r0:r1]) for a, r0, r1 in self.plan])


@dataclass
class TSAccount:
    job: object  # AccountJob
    ids: torch.Tensor
    labels: torch.Tensor
    schedule: object
    trainer: ts_peft.TSTrainer
    modules: dict[str, ts_peft.TSAdapterLinear]
    total: int
    last_epoch: int
    losses: list
    ppl_before: float
    eval_ids: torch.Tensor | None = None
    eval_labels: torch.Tensor | None = None
    pending: tuple | None = None

    @property
    def account(self) -> str:
        return self.job.cfg.account


class PackedTS:
    """The engine: `run(jobs, eos_id, on_done)` trains every job's account, at most `max_resident`
    at once and `max_rows` rows a micro-batch, and calls on_done(TSAccount, result, modules,
    trainer) as each finishes (then frees it). Equal to the solo path on a base without dropout
    (the tkllm presets have none): packing draws the global RNG in another order."""

    def __init__(self, model: nn.Module, method: str, target_modules: list[str] | None = None,
                 max_resident: int = 64, max_rows: int = 64):
        if method not in METHODS:
            raise ValueError(f"packed token-selective training runs {METHODS}, not {method!r}")
        self.model, self.method, self.max_resident, self.max_rows = model, method, max_resident, max_rows
        self.routers: dict[str, TSRouter] = Insertion(model, TSRouter, list(target_linears(model, target_modules))).modules
        model.register_forward_pre_hook(self._masks, with_kwargs=True)
        self.device = next(model.parameters()).device
        self.stats = {"train_steps": 0, "rows": 0, "max_resident": 0}
        self.on_step: Callable | None = None

    def run(self, jobs: Iterable, eos_id: int, on_done: Callable) -> dict:
        queue, live = iter(jobs), []
        while True:
            while len(live) < self.max_resident:
                job = next(queue, None)
                if job is None:
                    break
                live.append(self._admit(job, eos_id))
            if not live:
                return self.stats
            self.stats["max_resident"] = max(self.stats["max_resident"], len(live))
            picked, rows = [], 0
            for acct in live:  # each account's next batch, longest-waiting first, while rows fit
                if acct.pending is None:
                    acct.pending = next(acct.schedule, None)
                n = acct.pending[0].shape[0] if acct.pending is not None else 0
                if n and (not picked or rows + n <= self.max_rows):
                    picked.append(acct)
                    rows += n
            if picked:
                self._step(picked)
                live = [a for a in live if a not in picked] + picked  # round robin: no account starves
            for acct in [a for a in live if a.pending is None and len(a.losses) == a.total]:
                live.remove(acct)
                on_done(acct, self._finish(acct), acct.modules, acct.trainer)

    def _admit(self, job, eos_id: int) -> TSAccount:
        cfg = job.cfg
        torch.manual_seed(cfg.seed)  # as train_account: the adapters' init draws from this
        ids, labels = (t.to(self.device) for t in pack(job.train_posts, eos_id, cfg.seq_len))
        kind = "ts-dora" if cfg.method == "dora" else cfg.method
        modules = {}
        for name, router in self.routers.items():  # the order attach creates them in
            m = ts_peft.KINDS[kind](router.base, cfg.lora_rank, 2.0 * cfg.lora_rank, 0.0, cfg.ts_bandwidth)
            router.adapters[cfg.account] = modules[name] = m
        trainer = ts_peft.TSTrainer(self.model, modules, None, cfg.lr, cfg.weight_decay, cfg.ts_target_rate,
                                    cfg.ts_penalty, cfg.ts_tau_lr, learn_tau=cfg.method != "dora")
        gen = torch.Generator().manual_seed(cfg.seed)
        steps = total_steps(cfg, ids.shape[0])
        acct = TSAccount(job, ids, labels, (p for k, p in events(cfg, ids, labels, gen) if k == "step"), trainer,
                         modules, steps, steps - -(-ids.shape[0] // cfg.batch_size), [], 0.0)
        acct.eval_ids, acct.eval_labels = (t.to(self.device) for t in pack(job.eval_posts, eos_id, cfg.seq_len))
        acct.ppl_before = self._perplexity(acct, adapters=False)
        return acct

    def _step(self, picked: list[TSAccount]) -> None:
        ids = torch.cat([a.pending[0] for a in picked])
        labels = torch.cat([a.pending[1] for a in picked])
        spans, r = [], 0
        for a in picked:
            n = a.pending[0].shape[0]
            spans.append((a, r, r + n))
            r += n
            if len(a.losses) == a.last_epoch:
                a.trainer.report()  # reset: the training rates reported cover the last epoch
        self._route([(a.account, r0, r1) for a, r0, r1 in spans], labels, train=True)
        for a in picked:
            a.trainer.opt.zero_grad(set_to_none=True)
            if a.trainer.taus is not None:
                a.trainer.taus.zero_grad()
        self.model.train()
        logits = self.model(input_ids=ids).logits
        total, losses = 0.0, []
        for a, r0, r1 in spans:  # each account's own mean loss (as alone) plus its own rate penalty
            loss = _lm_loss(logits[r0:r1], labels[r0:r1])
            pen = ts_peft.penalty(a.modules, a.trainer.target_rate, a.trainer.penalty_weight)
            total = total + loss + pen.to(loss.device)
            losses.append(loss.detach())
        total.backward()
        for a, loss in zip(picked, losses):
            a.trainer.opt.step()
            if a.trainer.taus is not None:
                a.trainer.taus.step()
            a.losses.append(float(loss))
            a.pending = None
        self._route([], None, train=False)
        self.stats["train_steps"] += 1
        self.stats["rows"] += ids.shape[0]
        if self.on_step is not None:
            self.on_step(self, picked)

    def _route(self, plan: list[tuple[str, int, int | None]], labels: torch.Tensor | None, train: bool) -> None:
        """Point every router at `plan` (r1 None: to the last row); the adapters' mode, and their
        real-token masks from `labels` (else the model's forward sets them from its own labels)."""
        for router in self.routers.values():
            router.plan = plan
        for account, r0, r1 in plan:
            for router in self.routers.values():
                m = router.adapters[account]
                m.train(train)
                m.token_mask = None if labels is None else labels[r0:r1] != -100

    def _masks(self, _model, args, kwargs) -> None:
        """Forward pre-hook: each planned account's real tokens, from the forward's labels."""
        labels = kwargs.get("labels")
        if labels is not None:
            for router in self.routers.values():
                for account, r0, r1 in router.plan:
                    router.adapters[account].token_mask = labels[r0:r1] != -100

    def _perplexity(self, acct: TSAccount, adapters: bool = True) -> float:
        """Held-out perplexity of the account alone, as the single path measures it: the base, or
        with its adapters (gated inference, counted on real tokens by the model's mask hook)."""
        from tkllm_ray.train.single import perplexity

        self._route([(acct.account, 0, None)] if adapters else [], None, train=False)
        try:
            return perplexity(self.model, acct.eval_ids, acct.eval_labels, acct.job.cfg.batch_size)
        finally:
            self._route([], None, train=False)

    def _finish(self, acct: TSAccount) -> dict:
        cfg = acct.job.cfg
        train_report = acct.trainer.report()
        ppl_after = self._perplexity(acct)
        result = {"account": acct.account, "method": cfg.method, "device": str(self.device),
                  "eval_ppl_before": acct.ppl_before, "eval_ppl_after": ppl_after, "train_loss_last": acct.losses[-1],
                  "steps": len(acct.losses), "trainable_params": sum(p.numel() for p in ts_peft.adapter_params(acct.modules)),
                  "train_tokens": int((acct.labels != -100).sum()) * cfg.epochs,
                  "loss_curve": [round(x, 4) for x in acct.losses],
                  "token_selective": {"train": train_report, "eval": acct.trainer.report()}}
        for router in self.routers.values():
            router.adapters.pop(acct.account, None)
        return result


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM loss of `model(input_ids, labels).loss` for these rows: next-token cross
    entropy in fp32, mean over the predicted (non -100) positions."""
    shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=-100)
