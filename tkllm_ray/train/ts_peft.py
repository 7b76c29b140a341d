"""Token-selective PEFT (TS-LoRA, TS-DoRA; arXiv 2511.16147): an adapter whose update each token
takes or skips, by a threshold learned per layer.

For a frozen target linear W0 with adapter M, token i's output is

    h_i = W0 x_i + S_i · M(x_i),   r_i = ‖M(x_i)‖₂ / ‖W0 x_i‖₂,   S_i = 1(r_i ≥ τ),   τ ≥ 0 per layer.

M is LoRA (M(x) = s·B A x, B zero at first) or DoRA (magnitude m and direction W0 + s·B A, the
direction's row norms held constant in backward as in the DoRA paper: M(x) is the DoRA output
minus W0 x). At the start M = 0, so with τ = 0 every token takes its (zero) update: training
starts as plain LoRA / DoRA, and a layer with τ = 0 is exactly LoRA / DoRA (tested).

How τ learns (our derivation; the paper publishes no code). Per layer the objective is

    F(θ, τ) = L(θ, τ) + λ (ā − ρ)²,   ā = mean_i S_i  (the layer's token activation rate),

with ρ the target activation rate and λ the sparsity penalty (config `ts_target_rate`,
`ts_penalty`).
1. The gate is a proximal step. Hard thresholding z ↦ z·1(|z| ≥ τ) is the proximal operator of
   the L0 penalty (τ²/2)‖z‖₀. Applied to the relative update size r_i, it keeps an update only
   where its size pays the penalty. So the forward pass *is* the prox step of an L0-regularised
   choice of which tokens get updates, and τ sets the penalty's price.
2. An approximate gradient for τ. L depends on τ only through the indicators, whose derivative is
   zero almost everywhere. Smooth the step with a triangle kernel K_ε of half-width ε around τ:
   ∂S_i/∂τ ≈ −K_ε(r_i − τ). Backpropagation gives g_i = ∂F/∂S_i = ⟨∂L/∂h_i, M(x_i)⟩ + 2λ(ā − ρ)/N,
   so ∂F/∂τ ≈ −Σ_i g_i K_ε(r_i − τ). Read it token by token near the threshold:
   - an update that lowers the loss (g_i < 0) pulls τ down, admitting more tokens;
   - one that raises it pushes τ up;
   - an activation rate above ρ pushes τ up.
   ε is `ts_bandwidth` times the batch's median r (scale-free: r has no natural unit).
3. The step: Adam moments on that gradient (the paper's "Adam-style momentum": the estimate is
   noisy and badly scaled), with a step size relative to the layer's typical r (the last batch's
   median: r's scale grows as the adapter learns, and a fixed step would jump past every token
   into a region where the kernel sees none), then τ ← max(τ, 0), the projection onto the
   feasible set (the prox of its indicator).
r is detached: the adapter learns from the tokens it serves (S_i multiplies its output), never
through the gate.

Rates count real tokens only. `attach` puts a hook on the model that reads each forward's
`attention_mask` (else its `labels`, -100 marking padding as `train.data.pack` writes it) and
hands the modules that token mask: the counts, the skipped FLOPs and the penalty's rate leave
padding out. A forward with neither counts every position.

At inference the gate skips work, not just output. For TS-LoRA, ‖M(x)‖ = s·√(uᵀ(BᵀB)u) with
u = A x (r numbers per token), so the B projection (2·out·rank FLOPs a token, half the adapter)
runs only for tokens that pass (`skipped_flops`). For TS-DoRA the update's norm needs B u, so
only the final scale-and-add is skipped.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tkllm_ray.train.baselines import Insertion

EPS = 1e-12


class ThresholdGate(torch.autograd.Function):
    """S = 1(r ≥ τ) forward; backward: ∂/∂τ ≈ −Σ grad_S · K_ε(r − τ), nothing into r."""

    @staticmethod
    def forward(ctx, r: torch.Tensor, tau: torch.Tensor, width: torch.Tensor):
        ctx.save_for_backward(r, tau, width)
        return (r >= tau).to(r.dtype)

    @staticmethod
    def backward(ctx, grad_s):
        r, tau, width = ctx.saved_tensors  # width a device scalar: no host sync in the step
        w = width.clamp_min(EPS)
        kernel = torch.clamp(1 - (r - tau).abs() / w, min=0) / w
        grad = -(grad_s * kernel).sum().reshape(tau.shape)
        # width 0: every r alike (e.g. a zero adapter at the start): nothing to learn about τ
        return None, torch.where(width > 0, grad, torch.zeros_like(grad)), None


class TSAdapterLinear(nn.Module):
    """A frozen base linear with a token-selective adapter (subclasses: TSLoRALinear, TSDoRALinear)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, tau: float = 0.0, bandwidth: float = 0.5):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        out_f, in_f = base.weight.shape
        dev, dtype = base.weight.device, torch.float32
        self.rank, self.scale, self.bandwidth = rank, alpha / rank, bandwidth
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA: A random, B zero
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=dev, dtype=dtype))
        self.tau = nn.Parameter(torch.tensor(float(tau), device=dev))
        self.token_mask: torch.Tensor | None = None  # real tokens of this forward (set by attach's hook)
        self.skip_flops = 0  # FLOPs a token skips at inference when its gate is shut (TS-LoRA: the B projection)
        self.last_rate: torch.Tensor | None = None  # this forward's activation rate (a tensor: the penalty's input)
        self.r_scale = torch.zeros((), device=dev)  # the last training batch's median r: the scale of τ's steps
        self._counts = {"tokens": 0, "active": 0, "skipped_flops": 0}
        self._pending: torch.Tensor | None = None  # device sums [tokens, active, skipped] not yet in _counts

    @property
    def counts(self) -> dict[str, int]:
        """Real tokens seen, those whose gate was open, FLOPs skipped: summed on the device and read
        here (one sync), so a training step never waits on them. Reset with `counts.update(...)`."""
        if self._pending is not None:
            tokens, active, skipped = self._pending.tolist()
            self._pending = None
            self._counts["tokens"] += tokens
            self._counts["active"] += active
            self._counts["skipped_flops"] += skipped * self.skip_flops
        return self._counts

    def update(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0 = self.base(x)
        if not torch.is_grad_enabled() and not self.training:
            return self._infer(x, y0)
        m = self.update(x, y0)
        r = (m.float().norm(dim=-1) / y0.float().norm(dim=-1).clamp_min(EPS)).detach()
        self.r_scale = r.median()
        width = self.bandwidth * self.r_scale
        s = ThresholdGate.apply(r, self.tau, width)
        real = self._real(s)
        self.last_rate = (s * real).sum() / real.sum().clamp_min(1)  # over the real tokens
        self._count(s)
        return y0 + (s.unsqueeze(-1) * m).to(y0.dtype)

    def _real(self, s: torch.Tensor) -> torch.Tensor:
        """Which of the gate's positions are real tokens (bool; all of them without a mask of its shape)."""
        mask = self.token_mask
        return torch.ones_like(s, dtype=torch.bool) if mask is None or mask.shape != s.shape else mask

    def _count(self, s: torch.Tensor, skipping: bool = False) -> None:
        """Add a forward's real tokens and those whose gate was open; `skipping`: the shut ones
        skipped `skip_flops` each (inference; training computes every update)."""
        real = self._real(s)
        tokens, active = real.sum(), ((s.detach() > 0) & real).sum()
        new = torch.stack([tokens, active, tokens - active if skipping else torch.zeros_like(tokens)])
        self._pending = new if self._pending is None else self._pending + new

    def _infer(self, x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
        out, keep = infer(self.kind, self.tensors(), self.scale, self.base, x, y0)
        self._count(keep.float(), skipping=True)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter as plain tensors (what a server holds per account: `infer` reads them)."""
        return {n: p.detach() for n, p in self.named_parameters() if not n.startswith("base.")}

    def activation_rate(self) -> float:
        return self.counts["active"] / max(self.counts["tokens"], 1)


class TSLoRALinear(TSAdapterLinear):
    kind = "ts-lora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, tau: float = 0.0, bandwidth: float = 0.5):
        super().__init__(base, rank, alpha, tau, bandwidth)
        self.skip_flops = 2 * self.lora_B.shape[0] * rank  # the B projection a shut gate saves

    def update(self, x, y0):
        return (x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T) * self.scale


class TSDoRALinear(TSAdapterLinear):
    kind = "ts-dora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, tau: float = 0.0, bandwidth: float = 0.5):
        super().__init__(base, rank, alpha, tau, bandwidth)
        self.magnitude = nn.Parameter(base.weight.detach().float().norm(dim=1))  # DoRA's m: ‖W0‖ per output row

    def update(self, x, y0):
        return dora_update(self.lora_A, self.lora_B, self.magnitude, self.scale, self.base, x, y0)


def dora_update(a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scale: float, base: nn.Linear,
                x: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """DoRA's output minus the base's: m · (W0 + s·BA)x / ‖W0 + s·BA‖ − W0x, the direction's row
    norms held constant in backward."""
    direction = base.weight.float() + scale * (b @ a)
    ratio = magnitude / direction.norm(dim=1).detach().clamp_min(EPS)
    bias = base.bias.float() if base.bias is not None else 0.0
    lora = (x.to(a.dtype) @ a.T @ b.T) * scale
    return (ratio - 1) * (y0.float() - bias) + ratio * lora


def infer(kind: str, t: dict[str, torch.Tensor], scale: float, base: nn.Linear, x: torch.Tensor,
          y0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated inference of one module's adapter (tensors `t`: lora_A, lora_B, tau, DoRA's magnitude)
    on rows x whose base output is y0 -> (y0 + S·M(x), S as bool). TS-LoRA gates from u = A x and
    BᵀB, and runs the B projection only for the tokens that pass; TS-DoRA's gate needs M(x) whole.
    The training modules' inference and the server's adapters both run this."""
    a, b, tau = t["lora_A"], t["lora_B"], t["tau"]
    if kind == "ts-dora":
        m = dora_update(a, b, t["magnitude"], scale, base, x, y0)
        keep = m.float().norm(dim=-1) / y0.float().norm(dim=-1).clamp_min(EPS) >= tau
        return y0 + (keep.unsqueeze(-1) * m).to(y0.dtype), keep
    u = x.to(a.dtype) @ a.T  # (..., rank)
    norm_m = scale * torch.einsum("...i,ij,...j->...", u, b.T @ b, u).clamp_min(0).sqrt()
    keep = norm_m / y0.float().norm(dim=-1).clamp_min(EPS) >= tau
    out = y0.clone()
    rows = keep.nonzero(as_tuple=True)
    out[rows] += ((u[rows] @ b.T) * scale).to(y0.dtype)
    return out, keep


def penalty(modules: dict[str, TSAdapterLinear], target_rate: float, weight: float) -> torch.Tensor:
    """λ Σ_layers (ā − ρ)² over this forward's activation rates (add it to the loss)."""
    rates = [m.last_rate for m in modules.values() if m.last_rate is not None]
    if not rates or weight == 0:
        return torch.zeros(())
    return weight * sum((r - target_rate) ** 2 for r in rates)


class TauOptimizer:
    """Adam on the thresholds' approximate gradients, each step `lr` times its layer's median r,
    then τ ← max(τ, 0). Adam runs at lr 1 and its step is scaled after, on the device: the same
    step as lr·r, without reading r to the host."""

    def __init__(self, modules: dict[str, TSAdapterLinear], lr: float):
        self.modules, self.lr = list(modules.values()), lr
        self.taus = [m.tau for m in self.modules]
        self.opt = torch.optim.Adam([{"params": [t]} for t in self.taus], lr=1.0)

    def step(self) -> None:
        with torch.no_grad():
            before = [t.detach().clone() for t in self.taus]
        self.opt.step()
        with torch.no_grad():
            for t, b, m in zip(self.taus, before, self.modules):
                scale = self.lr * torch.as_tensor(m.r_scale, device=t.device).clamp_min(EPS)
                t.copy_((b + (t - b) * scale).clamp_(min=0))

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


KINDS = {"ts-lora": TSLoRALinear, "ts-dora": TSDoRALinear}


def _token_mask(model: nn.Module, args, kwargs) -> None:
    """Forward pre-hook (`attach` puts it on the model): which positions are real tokens, for the
    adapters' counts. `attention_mask` if given, else `labels` != -100 (this repo labels only
    padding -100: `train.data.pack`), else none (every position counts)."""
    mask = kwargs.get("attention_mask")
    if mask is None and kwargs.get("labels") is not None:
        mask = kwargs["labels"] != -100
    mask = None if mask is None else mask.bool()
    for m in model.modules():
        if isinstance(m, TSAdapterLinear):
            m.token_mask = mask


def attach(model: nn.Module, method: str, linears: dict[str, nn.Linear], rank: int, alpha: float | None = None,
           tau: float = 0.0, bandwidth: float = 0.5) -> dict[str, TSAdapterLinear]:
    """Freeze `model` and wrap each of `linears` (name -> module) in a token-selective adapter."""
    if method not in KINDS:
        raise ValueError(f"unknown token-selective method {method!r}: choose one of {sorted(KINDS)}")
    alpha = alpha if alpha is not None else 2.0 * rank
    if not getattr(model, "_ts_token_mask_hook", False):  # once per model (a deep copy keeps it)
        model.register_forward_pre_hook(_token_mask, with_kwargs=True)
        model._ts_token_mask_hook = True
    return Insertion(model, lambda lin: KINDS[method](lin, rank, alpha, tau, bandwidth), list(linears)).modules


def _own(modules: dict[str, TSAdapterLinear]) -> dict[str, nn.Parameter]:
    """The adapters' parameters (A, B, τ, DoRA's magnitude) by qualified name; not the bases'."""
    return {f"{name}.{n}": p for name, m in modules.items() for n, p in m.named_parameters()
            if not n.startswith("base.")}


def adapter_params(modules: dict[str, TSAdapterLinear]) -> list[nn.Parameter]:
    """What the model's optimizer trains: everything but the thresholds (TauOptimizer's)."""
    return [p for n, p in _own(modules).items() if not n.endswith(".tau")]


def state_dict(modules: dict[str, TSAdapterLinear]) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in _own(modules).items()}


def load_state(modules: dict[str, TSAdapterLinear], tensors: dict[str, torch.Tensor]) -> None:
    """Load `state_dict` output into attached modules of the same method and shapes."""
    own = _own(modules)
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors))[:3], sorted(set(tensors) - set(own))[:3]
        raise ValueError(f"adapter tensors do not match the attached modules (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(tensors[n])


def ranking(modules: dict[str, TSAdapterLinear]) -> list[tuple[str, float]]:
    """Modules by measured activation rate, highest first (least sparse: the most important)."""
    return sorted(((n, m.activation_rate()) for n, m in modules.items()), key=lambda kv: -kv[1])


def top_names(rates: dict[str, float], fraction: float) -> list[str]:
    """The `fraction` of module names with the highest activation rate (the least sparse), in
    `ranking`'s order: what `keep_top` keeps, from rates measured elsewhere (e.g. a training report)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ranked = sorted(rates.items(), key=lambda kv: -kv[1])
    return [n for n, _ in ranked[: max(1, round(fraction * len(ranked)))]]


def keep_top(model: nn.Module, modules: dict[str, TSAdapterLinear], fraction: float) -> dict[str, TSAdapterLinear]:
    """Keep the `fraction` least sparse modules; put the others' plain base linears back."""
    keep = set(top_names({n: m.activation_rate() for n, m in modules.items()}, fraction))
    for name, m in modules.items():
        if name not in keep:
            model.set_submodule(name, m.base)
    return {n: m for n, m in modules.items() if n in keep}


class TSTrainer:
    """One account's token-selective fine-tune: AdamW on the adapters, TauOptimizer on the
    thresholds, the loss plus the activation-rate penalty. `learn_tau=False` holds every τ where it
    is, with no penalty: at τ = 0 the gate stays open and the adapters are plain LoRA / DoRA."""

    def __init__(self, model: nn.Module, modules: dict[str, TSAdapterLinear], loss_fn, lr: float,
                 weight_decay: float, target_rate: float, penalty_weight: float, tau_lr: float,
                 learn_tau: bool = True):
        self.model, self.modules, self.loss_fn = model, modules, loss_fn
        self.target_rate, self.penalty_weight = target_rate, penalty_weight if learn_tau else 0.0
        self.opt = torch.optim.AdamW(adapter_params(modules), lr=lr, weight_decay=weight_decay)
        self.taus = TauOptimizer(modules, tau_lr) if learn_tau else None
        if not learn_tau:
            for m in modules.values():
                m.tau.requires_grad_(False)

    def step(self, batch) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        if self.taus is not None:
            self.taus.zero_grad()
        loss = self.loss_fn(self.model, batch)
        (loss + penalty(self.modules, self.target_rate, self.penalty_weight).to(loss.device)).backward()
        self.opt.step()
        if self.taus is not None:
            self.taus.step()
        return float(loss.detach())

    def report(self, reset: bool = True) -> dict:
        """Token activation rates (overall and per module) and skipped FLOPs since the last reset;
        `skipped_flops_share`: of the adapters' per-token FLOPs (A and B projections, 2·rank·(in+out))."""
        mods = self.modules.values()
        tokens = sum(m.counts["tokens"] for m in mods)
        skipped = sum(m.counts["skipped_flops"] for m in mods)
        adapter_flops = sum(m.counts["tokens"] * 2 * m.rank * sum(m.base.weight.shape) for m in mods)
        out = {"activation_rate": sum(m.counts["active"] for m in mods) / max(tokens, 1),
               "tokens": tokens, "skipped_flops": skipped, "skipped_flops_share": skipped / max(adapter_flops, 1),
               "per_module": {n: round(m.activation_rate(), 4) for n, m in self.modules.items()},
               "tau": {n: round(float(m.tau.detach()), 6) for n, m in self.modules.items()}}
        if reset:
            for m in mods:
                m.counts.update(tokens=0, active=0, skipped_flops=0)
        return out
