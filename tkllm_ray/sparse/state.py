"""One account's trainable sparse delta, apart from any model: sorted indices and fp32 values per
module, and AdamW over the values only. GSPF attaches it to a model (SparseDeltaLinear modules
share its value tensors); the packed engine keeps thousands of them beside one shared base.

Re-selection (`install` with the learned delta) keeps the value of every entry that stays
selected; new entries start at zero. Optimizer state is carried for staying entries (`carry`) or
dropped (`reset`). AdamW keeps one step counter per tensor, so under `carry` new entries share the
tensor's bias correction: a deliberate approximation (SpIEL keeps a per-entry age instead);
`reset` is exact Adam from scratch. Weight decay is decoupled and acts on Δ (pulls the delta
toward the base), not on W + Δ.
"""

from __future__ import annotations

import torch
from torch import nn

Delta = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (sorted flat indices, values)


class SparseState:
    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 reselect_state: str = "carry"):
        if reselect_state not in ("carry", "reset"):
            raise ValueError(f"reselect_state must be 'carry' or 'reset', got {reselect_state!r}")
        self.lr, self.betas, self.weight_decay, self.reselect_state = lr, betas, weight_decay, reselect_state
        self.indices: dict[str, torch.Tensor] = {}
        self.values: dict[str, nn.Parameter] = {}
        self.opt: torch.optim.Optimizer | None = None
        self.history: list[dict] = []
        self._copied: torch.cuda.Event | None = None  # set while a copy to pinned host memory is in flight

    def install(self, indices: dict[str, torch.Tensor], learned: Delta | None = None) -> dict:
        """A new selection (modules -> sorted indices, on their device). With `learned` (the previous
        delta), staying entries keep their values and, under `carry`, their Adam moments."""
        learned = learned or {}
        values, carried, kept = {}, {}, 0
        old_total = sum(i.numel() for i, _ in learned.values())
        for n, idx in indices.items():
            if idx.numel() == 0:
                continue
            v = torch.zeros(idx.numel(), device=idx.device)
            if n in learned:  # learned values may sit elsewhere (e.g. on the CPU)
                old_idx, old_v = learned[n][0].to(idx.device), learned[n][1].to(idx.device)
                pos, hit = match_sorted(idx, old_idx)
                v[hit] = old_v[pos[hit]].float()
                carried[n] = (pos, hit)
                kept += int(hit.sum())
            values[n] = v
        old_state = self._state_by_module()
        self.indices = {n: indices[n] for n in values}
        self.values = {n: nn.Parameter(v) for n, v in values.items()}
        self.opt = torch.optim.AdamW(list(self.values.values()), lr=self.lr, betas=self.betas,
                                     weight_decay=self.weight_decay)
        if self.reselect_state == "carry":
            for n, p in self.values.items():
                if n in old_state and n in carried:
                    pos, hit = carried[n]
                    st = old_state[n]
                    new = {"step": st["step"].clone(), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                    new["exp_avg"][hit] = st["exp_avg"][pos[hit]]
                    new["exp_avg_sq"][hit] = st["exp_avg_sq"][pos[hit]]
                    self.opt.state[p] = new
        record = {"entries": sum(i.numel() for i in self.indices.values()),
                  "overlap": kept / old_total if old_total else None}
        self.history.append(record)
        return record

    def _state_by_module(self) -> dict[str, dict]:
        if self.opt is None:
            return {}
        return {n: dict(self.opt.state[p]) for n, p in self.values.items() if p in self.opt.state}

    @property
    def k(self) -> int:
        return sum(i.numel() for i in self.indices.values())

    def live(self) -> Delta:
        """The delta as it trains (device tensors, values are the Parameters)."""
        return {n: (self.indices[n], self.values[n]) for n in self.values}

    @property
    def device(self) -> torch.device | None:
        return next(iter(self.indices.values())).device if self.indices else None

    def page(self, device: torch.device | str) -> None:
        """Move the whole state (indices, values, AdamW moments) to `device`, e.g. out to host memory
        and back while other accounts use the GPU. Each kind of tensor travels as one flat copy (all
        modules together: a few copies per account, not hundreds); out of a GPU into pinned memory,
        asynchronously, indices as int32 (16 bytes per entry stay, not 20). Reading the host copy
        waits for it (`wait`). The Parameter objects stay the same: AdamW keys its state by them."""
        device = torch.device(device)
        if self.device is None or self.device == device:
            return
        to_host = device.type == "cpu"
        pin = to_host and torch.cuda.is_available()

        def move(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
            flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
            if to_host:
                moved = torch.empty(flat.shape, dtype=dtype, pin_memory=pin).copy_(flat, non_blocking=pin)
            else:
                moved = flat.to(device, non_blocking=True).to(dtype)
            return [v.view(t.shape) for v, t in zip(moved.split([t.numel() for t in tensors]), tensors)]

        names = list(self.values)
        idx = move([self.indices[n] for n in names], torch.int32 if to_host else torch.int64)  # < 2^31 per module
        self.indices = dict(zip(names, idx))
        params = [self.values[n] for n in names]
        for p, v in zip(params, move([p.data for p in params], torch.float32)):
            p.data, p.grad = v, None
        for key in ("exp_avg", "exp_avg_sq"):
            states = [self.opt.state[p] for p in params if key in self.opt.state.get(p, {})]
            for st, v in zip(states, move([st[key] for st in states], torch.float32) if states else []):
                st[key] = v
        if pin:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def wait(self) -> None:
        """Block until a copy out to host memory has landed (before the host reads it)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def to_bytes(self) -> bytes:
        """Everything training needs to resume this account: selection, values, AdamW moments."""
        import io

        self.wait()

        opt = self._state_by_module()
        blob = {"indices": {n: i.cpu().long() for n, i in self.indices.items()},
                "values": {n: v.detach().cpu() for n, v in self.values.items()},
                "opt": {n: {k: t.cpu() for k, t in st.items()} for n, st in opt.items()}, "history": self.history}
        buf = io.BytesIO()
        torch.save(blob, buf)
        return buf.getvalue()

    def load_bytes(self, data: bytes, device: torch.device | str) -> None:
        import io

        blob = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
        self.install({n: i for n, i in blob["indices"].items()}, None)
        self.history = blob["history"]
        with torch.no_grad():
            for n, p in self.values.items():
                p.copy_(blob["values"][n])
                if n in blob["opt"]:  # torch keeps AdamW's step counter on the CPU (no sync per step)
                    self.opt.state[p] = {k: t.cpu() if k == "step" else t for k, t in blob["opt"][n].items()}

    def export(self) -> Delta:
        self.wait()
        return {n: (self.indices[n].detach().cpu().long(), self.values[n].detach().cpu().clone()) for n in self.values}


def match_sorted(new_idx: torch.Tensor, old_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each new index: its position in the sorted `old_idx` and whether it is there."""
    if old_idx.numel() == 0:
        return torch.zeros_like(new_idx), torch.zeros(new_idx.numel(), dtype=torch.bool, device=new_idx.device)
    pos = torch.searchsorted(old_idx, new_idx).clamp(max=old_idx.numel() - 1)
    return pos, old_idx[pos] == new_idx
