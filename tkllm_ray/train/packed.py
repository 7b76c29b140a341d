"""Packed multi-tenant GSPF: one resident base model, many accounts' sparse states, and micro-batches
that mix accounts (each row through its own account's W + Δ via the segmented op).

Every account follows its own event schedule (train/schedule.py, the one the single-account path
follows, from the same seed): its sensitivity passes and steps happen in the same order on the
same batches, only side by side with other accounts'. Each account's loss is its own batch mean,
and the packed loss is their sum, so each account's values get the gradient they would get alone;
each account steps its own AdamW. Packing changes the throughput, not the math: the results agree
with a solo run up to float rounding (the solo path adds Δ into a merged weight, the packed path as
a separate segmented term; in fp32 the deltas match to ~1e-5, tested; in bf16 the rounding differs).

On a base sharded with DeepSpeed ZeRO-3 (train/zero3.py) the workers run their passes in lockstep
(`lockstep`): the same loop, plus idle passes for a worker out of accounts and selection and
evaluation rounds every worker joins.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tkllm_ray.models.fused_norm import fuse_rms_norms
from tkllm_ray.sparse.delta_op import merged_weight
from tkllm_ray.sparse.delta_store import Delta, decode, encode
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.mixed import MixedDeltaLinear, rows_inputs, swap_in
from tkllm_ray.sparse.selection import select, weigh, zstats
from tkllm_ray.sparse.sensitivity import add_abs_grad, grads_from_embeddings, target_linears
from tkllm_ray.sparse.state import SparseState
from tkllm_ray.train.checkpoints import UserCheckpoints
from tkllm_ray.train.data import pack
from tkllm_ray.train.packed_eval import LockstepEval
from tkllm_ray.train.paging import StatePager
from tkllm_ray.train.schedule import events
from tkllm_ray.train.zero3 import Lockstep, gathered, weight_shape


@dataclass
class AccountJob:
    """One account to fine-tune: its config (FinetuneConfig, method gspf) and its token ids."""
    cfg: object
    train_posts: list[list[int]]
    eval_posts: list[list[int]]


@dataclass
class UserRun:
    job: AccountJob
    ids: torch.Tensor
    labels: torch.Tensor
    state: SparseState
    schedule: object
    pending: tuple | None = None
    warm: list = field(default_factory=list)  # warm-up batches still to run for the pending selection
    sens: dict = field(default_factory=dict)
    warm_done: int = 0
    losses: list = field(default_factory=list)
    consumed: int = 0  # schedule events taken: where a resumed run fast-forwards to
    ppl: dict = field(default_factory=dict)  # held-out perplexity "before" and "after" (run(evaluate=True))
    delta: Delta | None = None  # the published delta, once trained

    @property
    def account(self) -> str:
        return self.job.cfg.account

    def advance(self) -> None:
        self.pending = next(self.schedule, None)
        self.consumed += 1
        if self.pending is not None and self.pending[0] == "select":
            self.warm, self.sens, self.warm_done = list(self.pending[1]), {}, 0


def live_entries(state: SparseState) -> dict:
    return {n: (state.indices[n], v) for n, v in state.values.items()}


class BatchContext:
    """What the packed linears read during one forward/backward: whose rows, and per row group the
    entries {module: (indices, values)} its rows go through (the users' live states unless given).
    `always`: every module runs the segmented op, entries or not (lockstep: equal graphs)."""

    def __init__(self, users: list[UserRun], token_counts: list[int], sensitivity: bool,
                 entries: list[dict] | None = None, always: bool = False):
        self.users, self.token_counts, self.sensitivity, self.always = users, token_counts, sensitivity, always
        self.entries = entries if entries is not None else [live_entries(u.state) for u in users]
        self.offsets = [0, *torch.tensor(token_counts).cumsum(0).tolist()]

    def module_inputs(self, name: str, lin: nn.Linear):
        seg, values = rows_inputs([e.get(name) for e in self.entries], self.token_counts, lin, always=self.always)
        return seg, (values.detach() if self.sensitivity and values is not None else values)


class PackedLinear(MixedDeltaLinear):
    """A frozen base linear applying each row's own account delta; during a sensitivity pass it
    also hands its output gradient and input to the engine (per-account |dW| sums)."""

    def forward(self, x):
        y = super().forward(x)
        ctx = self.owner[0].ctx
        if ctx is not None and ctx.sensitivity and y.requires_grad:
            x2 = x.detach().reshape(-1, x.shape[-1])
            y.register_hook(lambda dy: self.owner[0].accumulate(self.name, dy, x2))
        return y


class PackedGSPF:
    """`state_budget`: device bytes for the resident accounts' states (None: only max_resident
    limits). With `host_budget` (bytes of pinned host memory) as well, states beyond the device
    budget are paged out to the host instead of keeping accounts waiting (train/paging.py)."""

    def __init__(self, model: nn.Module, target_modules: list[str] | None = None, max_resident: int = 64,
                 max_rows: int = 64, checkpoints: UserCheckpoints | None = None, state_budget: int | None = None,
                 host_budget: int | None = None, lockstep: Lockstep | None = None):
        if host_budget is not None and state_budget is None:
            raise ValueError("paging to host memory (host_budget) needs a device state_budget to page against")
        self.model, self.max_resident, self.max_rows = model, max_resident, max_rows
        self.checkpoints, self.lockstep = checkpoints, lockstep
        for p in model.parameters():
            p.requires_grad_(False)
        self.linears = target_linears(model, target_modules)
        swap_in(model, self.linears, self, PackedLinear)
        self.ctx: BatchContext | None = None
        self.on_step: Callable | None = None  # called after every train step (progress, fault injection)
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":  # a GPU's steps are bound by elementwise launches (models/fused_norm.py)
            fuse_rms_norms(model)
        self.pager = StatePager(self.device, sum(weight_shape(m.weight).numel() for m in self.linears.values()), state_budget,
                                host_budget)
        self._rr = 0  # round-robin start of warm-up passes: no account waits behind a fixed order
        self._warm_turn = False
        self.stats = {"train_steps": 0, "sensitivity_passes": 0, "rows": 0, "max_resident": 0}
        if lockstep is not None:
            self.stats["idle_passes"] = 0

    # -- admission and the loop ---------------------------------------------------------------
    def admit(self, job: AccountJob, eos_id: int) -> UserRun:
        cfg = job.cfg
        if cfg.method != "gspf":
            raise ValueError(f"the packed engine trains GSPF deltas, not {cfg.method!r}")
        ids, labels = (t.to(self.device) for t in pack(job.train_posts, eos_id, cfg.seq_len))
        gen = torch.Generator().manual_seed(cfg.seed)
        user = UserRun(job, ids, labels, SparseState(cfg.lr, weight_decay=cfg.weight_decay),
                       events(cfg, ids, labels, gen))
        saved = self.checkpoints.load(user.account) if self.checkpoints else None
        if saved is None:
            user.advance()
            return user
        # Resume: replay the schedule without computing (it only draws batch orders from the
        # seeded generator), then put back the state the account had at that point.
        while user.consumed < saved["consumed"]:
            user.advance()
        user.state.load_bytes(saved["state"], self.device)
        user.losses = list(saved["losses"])
        self.stats["resumed"] = self.stats.get("resumed", 0) + 1
        return user

    def run(self, jobs: Iterable[AccountJob], eos_id: int, on_done: Callable[[UserRun, Delta], None],
            evaluate: bool = False, until: Callable[[], bool] | None = None) -> dict:
        """Train every job; `on_done(user, delta)` as each account finishes. `evaluate`: each
        account's held-out perplexity before and after (`user.ppl`) is known by then. `until`:
        stop early, between passes, once it returns True (a time window; in lockstep every
        worker stops at the same pass, when any one's says so)."""
        self.eos_id = eos_id
        queue, resident = iter(jobs), []  # pulled lazily: an account's data is read when it is admitted
        exhausted, waiting = False, None
        evals = LockstepEval(self) if self.lockstep is not None else None
        while True:
            while not exhausted and len(resident) < self.max_resident:
                job = waiting or next(queue, None)
                if job is None:
                    exhausted = True
                elif resident and not self.pager.fits(job.cfg, resident):
                    waiting = job  # admitted once a resident account retires and frees its memory
                    break
                else:
                    waiting = None
                    resident.append(self.admit(job, eos_id))
                    self.pager.admitted(resident[-1])
                    if evaluate:
                        self._evaluate(evals, resident[-1], "before", None)
            stop = until is not None and until()
            if evals is not None:
                busy, due, stop = self.lockstep.max(int(bool(resident)), evals.forwards_due(), int(stop))
                for u in evals.run(due):  # every worker runs as many evaluation forwards as the busiest
                    self._finish(u, on_done)
                if not busy or stop:
                    break
                if not resident:
                    self._idle_pass()
                    self._select_round([])
                    continue
            elif not resident or stop:
                break
            self.stats["max_resident"] = max(self.stats["max_resident"], len(resident))
            selecting = [u for u in resident if u.pending[0] == "select"]
            stepping = [u for u in resident if u.pending[0] == "step"]
            # Warm-up and training passes take turns while both are due: warm-ups first would let a
            # steady stream of admissions starve training (on a 7B, 8 warm-up passes per account).
            self._warm_turn = not self._warm_turn
            if selecting and (self._warm_turn or not stepping):
                selecting.sort(key=lambda u: not u.sens)
                picked = self._fill(selecting[: self.pager.max_warming()], lambda u: u.warm[0])
                self.pager.prepare([u for u, _ in picked], resident)
                self._select_round(self._sensitivity_pass(picked))
            else:
                # oldest first: an account in training finishes as soon as it can (the round-robin of
                # every resident finished them all late together; no account waits longer than the
                # older ones' remaining steps)
                picked = self._fill(stepping, lambda u: u.pending[1], rotate=False)
                self.pager.prepare([u for u, _ in picked], resident)
                self._train_step(picked)
                self._select_round([])  # the others may be selecting
            for u in [u for u in resident if u.pending is None]:
                resident.remove(u)
                self.pager.retired(u)
                u.delta = u.state.export()
                if evaluate:
                    self._evaluate(evals, u, "after", u.delta)
                if evals is None or not evaluate:
                    self._finish(u, on_done)
        self.stats.update(self.pager.stats)
        return self.stats

    def _finish(self, u: UserRun, on_done: Callable) -> None:
        on_done(u, u.delta)
        if self.checkpoints:
            self.checkpoints.remove(u.account)  # published: nothing left to resume

    def _evaluate(self, evals: LockstepEval | None, user: UserRun, key: str, delta: Delta | None) -> None:
        """Unsharded: now, on the exact path (Δ scattered into the weights and restored). Sharded:
        queued for the next evaluation round (the mixed path, as in training)."""
        if evals is None:
            user.ppl[key] = self.perplexity(user.job.eval_posts, self.eos_id, user.job.cfg, delta)
        else:
            evals.add(user, key, delta)

    def _fill(self, users: list[UserRun], batch_of, rotate: bool = True) -> list[tuple[UserRun, tuple]]:
        """Accounts for the next micro-batch, up to max_rows rows (always at least one account):
        round-robin from a moving start, or (`rotate=False`) in the given order (admission order)."""
        start = self._rr % len(users) if rotate else 0
        order = users[start:] + users[:start]
        if rotate:  # the start moves with each round-robin fill only
            self._rr += 1
        out, rows = [], 0
        for u in order:
            b = batch_of(u)
            if out and rows + b[0].shape[0] > self.max_rows:
                break
            out.append((u, b))
            rows += b[0].shape[0]
        self.stats["rows"] += rows
        return out

    def _forward_backward(self, picked, sensitivity: bool) -> list[torch.Tensor]:
        """One packed forward and backward; returns each account's loss (its own batch mean)."""
        ids = torch.cat([b[0] for _, b in picked])
        lockstep = self.lockstep is not None
        ctx = BatchContext([u for u, _ in picked], [b[0].numel() for _, b in picked], sensitivity, always=lockstep)
        # Lockstep: backprop through every layer, whichever modules this worker's accounts train
        with self.batch(ctx, embedding_grads=sensitivity or lockstep):
            logits = self.model(input_ids=ids).logits
            losses, r0 = [], 0
            for _, (b_ids, b_labels) in picked:
                n = b_ids.shape[0]
                lg = logits[r0 : r0 + n, :-1].float()
                losses.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), b_labels[:, 1:].reshape(-1),
                                              ignore_index=-100))
                r0 += n
            torch.stack(losses).sum().backward()
        return losses

    @contextlib.contextmanager
    def batch(self, ctx: BatchContext, embedding_grads: bool = False):
        """The packed linears read `ctx` inside (forward and backward). `embedding_grads`: the graph
        starts at the embedding output, so gradients flow with every weight frozen."""
        self.ctx = ctx
        hook = grads_from_embeddings(self.model) if embedding_grads else None
        try:
            yield
        finally:
            self.ctx = None
            if hook is not None:
                hook.remove()

    def idle_batch(self) -> tuple[torch.Tensor, BatchContext]:
        """One row of pads through every module, without entries: a worker's share of a lockstep
        pass when it has none of its own (the others' passes gather the sharded weights)."""
        ids = torch.zeros(1, 8, dtype=torch.int64, device=self.device)
        return ids, BatchContext([], [ids.numel()], False, entries=[{}], always=True)

    # -- sensitivity ----------------------------------------------------------------------------
    def accumulate(self, name: str, dy: torch.Tensor, x2: torch.Tensor) -> None:
        dy2 = dy.reshape(-1, dy.shape[-1])
        off = self.ctx.offsets
        for i, u in enumerate(self.ctx.users):
            if name not in u.sens:
                u.sens[name] = torch.zeros(weight_shape(self.linears[name].weight), dtype=torch.float32, device=dy.device)
            add_abs_grad(u.sens[name], dy2[off[i] : off[i + 1]], x2[off[i] : off[i + 1]])

    def _sensitivity_pass(self, picked) -> list[UserRun]:
        self.model.eval()
        self._forward_backward(picked, sensitivity=True)
        self.stats["sensitivity_passes"] += 1
        ready = []
        for u, _ in picked:
            u.warm.pop(0)
            u.warm_done += 1
            if not u.warm:
                ready.append(u)
        return ready

    def _idle_pass(self) -> None:
        """Lockstep, no accounts left here: a forward and backward of the idle batch."""
        self.model.train()
        ids, ctx = self.idle_batch()
        with self.batch(ctx, embedding_grads=True):
            (self.model(input_ids=ids).logits.float().sum() * 0).backward()
        self.stats["idle_passes"] += 1

    def _select_round(self, ready: list[UserRun]) -> None:
        """Select the entries of every account whose warm-up just ended: scores z(S) · tanh|W + Δ_u|,
        one module at a time. Sharded, each weight is gathered once for all of them, in a round
        every worker joins (possibly with none of its own)."""
        if self.lockstep is not None:
            if not self.lockstep.max(len(ready))[0]:
                return
        elif not ready:
            return
        learned, stats = {}, {}
        for u in ready:
            for s in u.sens.values():
                s.div_(u.warm_done)
            stats[id(u)] = zstats(u.sens, u.job.cfg.scope)  # standardized as each module is weighed
            learned[id(u)] = {n: (i, v.detach()) for n, (i, v) in u.state.live().items()}
        for name, lin in self.linears.items():  # the same order on every worker
            with gathered([lin.weight]):
                for u in ready:
                    if name in u.sens:
                        have = learned[id(u)].get(name)
                        weigh(u.sens[name], merged_weight(lin.weight, *have) if have else lin.weight,
                              *stats[id(u)][name])
        for u in ready:
            cfg = u.job.cfg
            sel = select(u.sens, None, cfg.density, cfg.scope, cfg.top_layers, inplace=True)
            u.sens = {}
            u.state.install(sel.indices, learned[id(u)])
            u.advance()

    # -- training -------------------------------------------------------------------------------
    def _train_step(self, picked) -> None:
        self.model.train()
        for u, _ in picked:
            u.state.opt.zero_grad(set_to_none=True)
        losses = self._forward_backward(picked, sensitivity=False)
        for (u, _), loss in zip(picked, losses):
            u.state.opt.step()
            u.losses.append(float(loss.detach()))
            u.advance()
            ck = self.checkpoints
            if ck and ck.every and len(u.losses) % ck.every == 0 and u.pending and u.pending[0] == "step":
                ck.save(u)
        self.stats["train_steps"] += 1
        if self.on_step is not None:
            self.on_step(self, picked)

    # -- evaluation with one account owning the model -------------------------------------------
    @torch.no_grad()
    def perplexity(self, posts: list[list[int]], eos_id: int, cfg, delta: Delta | None = None) -> float:
        """Held-out perplexity of base (+ the delta as published, scattered into the weights and
        restored bit-exactly afterwards: the exact path when one account owns the batch)."""
        from tkllm_ray.train.single import perplexity

        ids, labels = (t.to(self.device) for t in pack(posts, eos_id, cfg.seq_len))
        applied = AppliedDelta(self.model, decode(encode(delta))) if delta else None
        try:
            return perplexity(self.model, ids, labels, cfg.batch_size)
        finally:
            if applied is not None:
                applied.restore()

