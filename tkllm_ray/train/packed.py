"""Packed multi-tenant GSPF: one resident base model, many accounts' sparse states, and micro-batches
that mix accounts (each row through its own account's W + Δ via the segmented op).

Every account follows its own event schedule (train/schedule.py, the one the single-account path
follows, from the same seed): its sensitivity passes and steps happen in the same order on the
same batches, only side by side with other accounts'. Each account's loss is its own batch mean,
and the packed loss is their sum, so each account's values get the gradient they would get alone;
each account steps its own AdamW. Packing changes the throughput, not the math: the results agree
with a solo run up to float rounding (the solo path adds Δ into a merged weight, the packed path as
a separate segmented term; in fp32 the deltas match to ~1e-5, tested; in bf16 the rounding differs).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tkllm_ray.sparse.delta_op import merged_weight
from tkllm_ray.sparse.delta_store import Delta, decode, encode
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.mixed import MixedDeltaLinear, rows_inputs, swap_in
from tkllm_ray.sparse.selection import select
from tkllm_ray.sparse.sensitivity import add_abs_grad, grads_from_embeddings, target_linears
from tkllm_ray.sparse.state import SparseState
from tkllm_ray.storage import exists, join, read_bytes, remove, write_bytes
from tkllm_ray.train.data import pack
from tkllm_ray.train.paging import StatePager
from tkllm_ray.train.schedule import events


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

    @property
    def account(self) -> str:
        return self.job.cfg.account

    def advance(self) -> None:
        self.pending = next(self.schedule, None)
        self.consumed += 1
        if self.pending is not None and self.pending[0] == "select":
            self.warm, self.sens, self.warm_done = list(self.pending[1]), {}, 0


class BatchContext:
    """What the packed linears read during one forward/backward: whose rows, whose entries."""

    def __init__(self, users: list[UserRun], token_counts: list[int], sensitivity: bool):
        self.users, self.token_counts, self.sensitivity = users, token_counts, sensitivity
        self.offsets = [0, *torch.tensor(token_counts).cumsum(0).tolist()]

    def module_inputs(self, name: str, lin: nn.Linear):
        parts = [(u.state.indices[name], u.state.values[name]) if name in u.state.values else None
                 for u in self.users]
        seg, values = rows_inputs(parts, self.token_counts, lin)
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


class UserCheckpoints:
    """Per-account training checkpoints under `root` (path or s3://): taken between steps, so a
    restarted worker resumes an in-flight account where it was instead of from scratch."""

    def __init__(self, root: str, every: int, options=None, run_id: str | None = None):
        self.root, self.every, self.options, self.run_id = root, every, options, run_id

    def _uri(self, account: str) -> str:
        return join(self.root, account, "state.pt")

    def save(self, user: "UserRun") -> None:
        buf = io.BytesIO()
        torch.save({"state": user.state.to_bytes(), "consumed": user.consumed, "losses": user.losses,
                    "run_id": self.run_id}, buf)
        write_bytes(self._uri(user.account), buf.getvalue(), self.options)  # one atomic object

    def load(self, account: str) -> dict | None:
        if not exists(self._uri(account), self.options):
            return None
        saved = torch.load(io.BytesIO(read_bytes(self._uri(account), self.options)), weights_only=True)
        return saved if saved.get("run_id") == self.run_id else None  # another run's state: start over

    def remove(self, account: str) -> None:
        remove(join(self.root, account), self.options)


class PackedGSPF:
    """`state_budget`: device bytes for the resident accounts' states (None: only max_resident
    limits). With `host_budget` (bytes of pinned host memory) as well, states beyond the device
    budget are paged out to the host instead of keeping accounts waiting (train/paging.py)."""

    def __init__(self, model: nn.Module, target_modules: list[str] | None = None, max_resident: int = 64,
                 max_rows: int = 64, checkpoints: UserCheckpoints | None = None, state_budget: int | None = None,
                 host_budget: int | None = None):
        if host_budget is not None and state_budget is None:
            raise ValueError("paging to host memory (host_budget) needs a device state_budget to page against")
        self.model, self.max_resident, self.max_rows = model, max_resident, max_rows
        self.checkpoints = checkpoints
        for p in model.parameters():
            p.requires_grad_(False)
        self.linears = target_linears(model, target_modules)
        swap_in(model, self.linears, self, PackedLinear)
        self.ctx: BatchContext | None = None
        self.on_step: Callable | None = None  # called after every train step (progress, fault injection)
        self.device = next(model.parameters()).device
        self.pager = StatePager(self.device, sum(m.weight.numel() for m in self.linears.values()), state_budget,
                                host_budget)
        self._rr = 0  # round-robin start: no account waits behind a fixed order
        self.stats = {"train_steps": 0, "sensitivity_passes": 0, "rows": 0, "max_resident": 0}

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

    def run(self, jobs: Iterable[AccountJob], eos_id: int, on_done: Callable[[UserRun, Delta], None]) -> dict:
        queue, resident = iter(jobs), []  # pulled lazily: an account's data is read when it is admitted
        exhausted, waiting = False, None
        while not exhausted or resident:
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
            if not resident:
                break
            self.stats["max_resident"] = max(self.stats["max_resident"], len(resident))
            selecting = [u for u in resident if u.pending[0] == "select"]
            if selecting:  # warm-ups under way first: each holds dense sensitivity sums until it selects
                selecting.sort(key=lambda u: not u.sens)
                picked = self._fill(selecting[: self.pager.max_warming()], lambda u: u.warm[0])
                self.pager.prepare([u for u, _ in picked], resident)
                self._sensitivity_pass(picked)
            else:
                picked = self._fill([u for u in resident if u.pending[0] == "step"], lambda u: u.pending[1])
                self.pager.prepare([u for u, _ in picked], resident)
                self._train_step(picked)
            for u in [u for u in resident if u.pending is None]:
                resident.remove(u)
                self.pager.retired(u)
                on_done(u, u.state.export())
                if self.checkpoints:
                    self.checkpoints.remove(u.account)  # published: nothing left to resume
        self.stats.update(self.pager.stats)
        return self.stats

    def _fill(self, users: list[UserRun], batch_of) -> list[tuple[UserRun, tuple]]:
        """Accounts for the next micro-batch, round-robin from a moving start, up to max_rows rows
        (always at least one account)."""
        start = self._rr % len(users)
        order = users[start:] + users[:start]
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
        self.ctx = BatchContext([u for u, _ in picked], [b[0].numel() for _, b in picked], sensitivity)
        h = grads_from_embeddings(self.model) if sensitivity else None
        try:
            logits = self.model(input_ids=ids).logits
            losses, r0 = [], 0
            for _, (b_ids, b_labels) in picked:
                n = b_ids.shape[0]
                lg = logits[r0 : r0 + n, :-1].float()
                losses.append(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), b_labels[:, 1:].reshape(-1),
                                              ignore_index=-100))
                r0 += n
            torch.stack(losses).sum().backward()
        finally:
            self.ctx = None
            if h is not None:
                h.remove()
        return losses

    # -- sensitivity ----------------------------------------------------------------------------
    def accumulate(self, name: str, dy: torch.Tensor, x2: torch.Tensor) -> None:
        dy2 = dy.reshape(-1, dy.shape[-1])
        off = self.ctx.offsets
        for i, u in enumerate(self.ctx.users):
            if name not in u.sens:
                u.sens[name] = torch.zeros(self.linears[name].weight.shape, dtype=torch.float32, device=dy.device)
            add_abs_grad(u.sens[name], dy2[off[i] : off[i + 1]], x2[off[i] : off[i + 1]])

    def _sensitivity_pass(self, picked) -> None:
        self.model.eval()
        self._forward_backward(picked, sensitivity=True)
        self.stats["sensitivity_passes"] += 1
        for u, _ in picked:
            u.warm.pop(0)
            u.warm_done += 1
            if not u.warm:
                self._select(u)
                u.advance()

    def _select(self, u: UserRun) -> None:
        cfg = u.job.cfg
        sens = {n: s.div_(u.warm_done) for n, s in u.sens.items()}
        learned = {n: (i, v.detach()) for n, (i, v) in u.state.live().items()}
        weights = {n: merged_weight(lin.weight, *learned[n]) if n in learned else lin.weight
                   for n, lin in self.linears.items()}  # sensitivity and scores are of W + Δ_u
        sel = select(sens, weights, cfg.density, cfg.scope, cfg.top_layers, inplace=True)
        u.sens = {}
        u.state.install(sel.indices, learned)

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

