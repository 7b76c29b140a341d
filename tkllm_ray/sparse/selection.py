"""GSPF selection: S̃ = z-score(S) · tanh(|θ|), then the top p% entries, globally or per module.

Global selection never concatenates all scores: each module offers its own top-k candidates
(no module can contribute more than k), and the k-th largest of those is the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Selection:
    indices: dict[str, torch.Tensor]  # module -> sorted flat int64 positions
    density: float

    @property
    def k(self) -> int:
        return sum(i.numel() for i in self.indices.values())


def _zstats(tensors: list[torch.Tensor]) -> tuple[float, float]:
    n = sum(t.numel() for t in tensors)
    s = sum(t.double().sum().item() for t in tensors)
    ss = sum(t.double().pow(2).sum().item() for t in tensors)
    mean = s / n
    return mean, max((ss / n - mean * mean), 0.0) ** 0.5


def scores(sensitivity: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], scope: str) -> dict[str, torch.Tensor]:
    if scope == "global":
        mean, std = _zstats(list(sensitivity.values()))
        stats = {n: (mean, std) for n in sensitivity}
    else:
        stats = {n: _zstats([s]) for n, s in sensitivity.items()}
    out = {}
    for n, s in sensitivity.items():
        mean, std = stats[n]
        z = (s - mean) / (std if std > 0 else 1.0)
        out[n] = z * torch.tanh(weights[n].detach().abs().float().to(s.device))
    return out


def select(sensitivity: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], density: float = 0.003,
           scope: str = "global") -> Selection:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if scope not in ("global", "per_module"):
        raise ValueError(f"scope must be 'global' or 'per_module', got {scope!r}")
    sc = scores(sensitivity, weights, scope)
    if scope == "per_module":
        idx = {n: _top(s.flatten(), max(1, round(density * s.numel()))) for n, s in sc.items()}
        return Selection(idx, density)
    total = sum(s.numel() for s in sc.values())
    k = max(1, round(density * total))
    cands = {n: torch.topk(s.flatten(), min(k, s.numel())).values for n, s in sc.items()}
    threshold = torch.topk(torch.cat([c.cpu() for c in cands.values()]), k).values[-1]
    # Entries above the threshold, then ties at it in module order, to exactly k in total.
    idx, left = {}, k
    above = {n: (s.flatten() > threshold).nonzero().flatten() for n, s in sc.items()}
    left -= sum(a.numel() for a in above.values())
    for n, s in sc.items():
        ties = (s.flatten() == threshold).nonzero().flatten()[: max(left, 0)]
        left -= ties.numel()
        idx[n] = torch.sort(torch.cat([above[n], ties])).values.to(torch.int64)
    return Selection(idx, density)


def _top(flat: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(flat, k).indices).values.to(torch.int64)


def placement(sel: Selection, shapes: dict[str, torch.Size]) -> dict[str, dict]:
    """Where the selected entries fall: count and share of each module's weights."""
    return {n: {"selected": int(i.numel()), "share": i.numel() / shapes[n].numel()} for n, i in sel.indices.items()}
