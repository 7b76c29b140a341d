"""MoE style experts (OCC-TKLLM §3.3): a few style domains (product showcase, vlog, storytelling,
educational, ...) shared by every account, each a sparse delta on the base, and a top-k router.

- Format: an experts root (path or s3://) holds each domain's delta as a published delta under
  `<root>/<domain>` (the account-delta format and store, method "style-expert") and the router
  under `<root>/router` (published the same way: `router.safetensors` with `weight` (domains,
  hidden) and `bias` (domains,), and `manifest.json` with the domains, top_k and the base's
  fingerprint). A reader sees whole versions only.
- Routing: r = softmax(W · mean(embed(prompt)) + b); the top_k domains are kept and their scores
  renormalised to sum to 1. A request (its `style`) or the account's manifest (`style`) can pin
  one domain instead (weight 1).
- Serving: a request's delta is its account's plus Σ r_i Δ_i, summed entry-wise into one sorted
  sparse delta, which the segmented op applies like any account's (`combine`).
Training (`train_experts`): GSPF on each domain's pooled posts (the single-account path), and
the router as a softmax regression on the base's mean prompt embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from tkllm_ray.errors import TkllmError
from tkllm_ray.sparse.delta_store import Delta, load_delta, save_delta
from tkllm_ray.storage import join, publish, read_bytes, read_latest, write_bytes

ROUTER = "router"


@dataclass
class StyleExperts:
    domains: list[str]
    weight: torch.Tensor  # (domains, hidden) fp32
    bias: torch.Tensor  # (domains,) fp32
    deltas: dict[str, Delta]
    top_k: int = 1

    def check_style(self, style: str) -> None:
        if style not in self.domains:
            raise TkllmError(f"unknown style {style!r}: this endpoint's styles are {', '.join(self.domains)}")

    @torch.no_grad()
    def route(self, prompt: list[int], embed: nn.Embedding) -> dict[str, float]:
        """The prompt's top_k domains and their renormalised router scores."""
        feats = mean_embeddings([prompt], embed)[0].to(self.weight.device)
        scores = torch.softmax(self.weight @ feats + self.bias, dim=-1)
        top = torch.topk(scores, min(self.top_k, len(self.domains)))
        w = top.values / top.values.sum()
        return {self.domains[i]: float(x) for i, x in zip(top.indices.tolist(), w.tolist())}

    def weights(self, prompt: list[int], embed: nn.Embedding, pin: str | None) -> dict[str, float]:
        if pin is not None:
            self.check_style(pin)
            return {pin: 1.0}
        return self.route(prompt, embed)


def combine(account: Delta | None, experts: dict[str, Delta], weights: dict[str, float]) -> Delta:
    """account + Σ weights[d] · experts[d], entry-wise: per module, one sorted, unique index list
    (summed in fp32, returned in the account's value dtype, else the experts')."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for delta, w in [(account, 1.0)] + [(experts[d], w) for d, w in weights.items()]:
        for name, (idx, vals) in (delta or {}).items():
            parts.setdefault(name, []).append((idx.long(), vals.float() * w))
    first = account or next(iter(experts.values()))
    dtype = next(iter(first.values()))[1].dtype
    out: Delta = {}
    for name, ps in parts.items():
        idx, vals = torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        summed = torch.zeros(uniq.numel(), dtype=torch.float32, device=vals.device).index_add_(0, inverse, vals)
        out[name] = (uniq, summed.to(dtype))
    return out


def save_experts(root: str, deltas: dict[str, Delta], weight: torch.Tensor, bias: torch.Tensor, base_model: str,
                 base_fingerprint: str, density: float, top_k: int = 1, metrics: dict | None = None,
                 options=None) -> None:
    """Publish every domain's delta, then the router that names them (so a reader that finds the
    router finds its experts)."""
    domains = list(deltas)
    if weight.shape[0] != len(domains) or bias.shape != (len(domains),):
        raise ValueError(f"router for {weight.shape[0]} domains, {len(domains)} expert deltas")
    if not 1 <= top_k <= len(domains):
        raise ValueError(f"top_k must be in 1..{len(domains)}, got {top_k}")
    for d in domains:
        save_delta(root, d, deltas[d], base_model, base_fingerprint, "style-expert", density, options=options)
    manifest = {"domains": domains, "top_k": top_k, "base_model": base_model, "base_fingerprint": base_fingerprint,
                "metrics": metrics or {}}
    blob = st_save({"weight": weight.float().contiguous().cpu(), "bias": bias.float().contiguous().cpu()})

    def write(vuri: str) -> None:
        write_bytes(join(vuri, "manifest.json"), json.dumps(manifest, indent=2).encode(), options)
        write_bytes(join(vuri, "router.safetensors"), blob, options)

    publish(join(root, ROUTER), write, options=options)


def load_experts(root: str, base_fingerprint: str | None = None, device="cpu", dtype: torch.dtype = torch.float32,
                 options=None) -> StyleExperts:
    version = read_latest(join(root, ROUTER), options)
    if version is None:
        raise TkllmError(f"no style experts published under {root} (no {ROUTER}/LATEST)")
    manifest = json.loads(read_bytes(join(root, ROUTER, version, "manifest.json"), options))
    if base_fingerprint is not None and manifest["base_fingerprint"] != base_fingerprint:
        raise TkllmError(f"the style experts under {root} were trained on base {manifest['base_model']}, "
                         "not the loaded base: load the matching base or retrain them")
    router = st_load(read_bytes(join(root, ROUTER, version, "router.safetensors"), options))
    deltas = {}
    for d in manifest["domains"]:
        delta, _ = load_delta(root, d, base_fingerprint=base_fingerprint, options=options)
        deltas[d] = {n: (i.to(device), v.to(device, dtype)) for n, (i, v) in delta.items()}
    return StyleExperts(manifest["domains"], router["weight"], router["bias"], deltas, manifest["top_k"])


def fit_router(features: torch.Tensor, labels: torch.Tensor, domains: int, steps: int = 300, lr: float = 0.1,
               weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax regression on standardised-by-training features: (weight, bias) in the raw
    feature space, full batch, Adam."""
    features = features.float()
    mu, sd = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mu) / sd
    lin = nn.Linear(z.shape[1], domains)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(z), labels).backward()
        opt.step()
    w = lin.weight.detach() / sd  # fold the standardisation in: W·(x - mu)/sd + b
    return w, lin.bias.detach() - w @ mu


@torch.no_grad()
def mean_embeddings(posts: list[list[int]], embed: nn.Embedding) -> torch.Tensor:
    return torch.stack([embed(torch.tensor(p, device=embed.weight.device)).float().mean(0).cpu() for p in posts])


def train_experts(cfg, base: nn.Module, eos_id: int, posts: dict[str, tuple[list[list[int]], list[list[int]]]],
                  progress: bool = False) -> tuple[dict[str, Delta], torch.Tensor, torch.Tensor, dict]:
    """Per domain (train posts, held-out posts): a GSPF expert from `cfg` (a FinetuneConfig, its
    method gspf) on a copy of `base`, and the router fitted on the train posts' mean embeddings.
    Metrics: each expert's held-out perplexity before/after and the router's held-out accuracy."""
    import copy

    from tkllm_ray.train.single import train_account

    deltas, metrics = {}, {"experts": {}}
    for d, (train, held) in posts.items():
        run = train_account(cfg.model_copy(update={"account": d}), copy.deepcopy(base), eos_id, train, held, progress)
        deltas[d] = run.delta
        metrics["experts"][d] = {k: run.result[k] for k in ("eval_ppl_before", "eval_ppl_after")}
    embed = base.get_input_embeddings()
    domains = list(posts)
    feats = torch.cat([mean_embeddings(posts[d][0], embed) for d in domains])
    labels = torch.cat([torch.full((len(posts[d][0]),), i) for i, d in enumerate(domains)])
    weight, bias = fit_router(feats, labels, len(domains))
    held = torch.cat([mean_embeddings(posts[d][1], embed) for d in domains])
    held_labels = torch.cat([torch.full((len(posts[d][1]),), i) for i, d in enumerate(domains)])
    metrics["router_heldout_accuracy"] = float(((held @ weight.T + bias).argmax(-1) == held_labels).float().mean())
    return deltas, weight, bias, metrics


def train_experts_from_dataset(cfg, root: str, top_k: int = 1, min_posts: int = 8, progress: bool = True) -> dict:
    """`tkllm experts`: every genre of an ingested dataset with at least `min_posts` train posts
    (and some eval posts) becomes a domain: its expert (GSPF per `cfg`) and the router, published
    under `root`."""
    from tkllm_ray.data.tokenizer import load_tokenizer
    from tkllm_ray.models import fingerprint
    from tkllm_ray.models.load import load_base_model
    from tkllm_ray.train.data import genre_posts
    from tkllm_ray.train.single import _device

    train, held = genre_posts(cfg.data, "train", cfg.storage), genre_posts(cfg.data, "eval", cfg.storage)
    domains = sorted(d for d in train if len(train[d]) >= min_posts and held.get(d))
    if len(domains) < 2:
        found = ", ".join(f"{d} ({len(p)})" for d, p in sorted(train.items())) or "none"
        raise TkllmError(f"style experts need at least 2 genres with {min_posts}+ train posts and some eval posts; "
                         f"{cfg.data} has: {found}")
    tok = load_tokenizer(cfg.tokenizer, cfg.storage)
    base = load_base_model(cfg.model, len(tok), cfg.seed, _device(cfg.device), cfg.storage, cfg.tokenizer)
    deltas, weight, bias, metrics = train_experts(cfg, base, tok.eos_token_id,
                                                  {d: (train[d], held[d]) for d in domains}, progress)
    save_experts(root, deltas, weight, bias, cfg.model, fingerprint(base), cfg.density, top_k, metrics, cfg.storage)
    return {"root": root, "domains": domains, **metrics}
