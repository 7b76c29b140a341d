"""Where the packed engine keeps its resident accounts' states: on the device while they fit in its
budget, the rest paged out to pinned host memory and brought back for the micro-batches that use
them. This is what lets a worker hold far more accounts in flight than GPU memory alone would
(tkllm-s at 0.3%: ~3.9M entries, ~125 MB of device state per account, 62 MB paged out).

The policy is least-recently-used: before each pass, the accounts in its micro-batch are paged in
and, while the budget is exceeded, the longest-unused other accounts are paged out. Copies are
issued on the compute stream without waiting on the host, so they are ordered with the kernels
that read and write the states.
"""

from __future__ import annotations

import torch

DEVICE_BYTES_PER_ENTRY = 32  # fp32 value, gradient, two AdamW moments; int64 index; int32 row, col
HOST_BYTES_PER_ENTRY = 16  # fp32 value and moments; int32 index (paged out: no gradient, no row/col)
SENSITIVITY_BYTES_PER_WEIGHT = 4  # a warming account's fp32 sensitivity sum, per target weight


class StatePager:
    def __init__(self, device: torch.device, target_weights: int, device_budget: int | None,
                 host_budget: int | None):
        self.device, self.n = torch.device(device), target_weights
        self.device_budget, self.host_budget = device_budget, host_budget
        self.last_used: dict[int, int] = {}  # id(user) -> pass counter, for the accounts on the device
        self.clock = 0
        self.stats = {"paged_out": 0, "paged_in": 0, "max_states_on_device": 0, "max_resident_with_state": 0}

    @property
    def paging(self) -> bool:
        return self.host_budget is not None and self.device_budget is not None

    # -- estimates ------------------------------------------------------------------------------
    def entries(self, cfg) -> int:
        return max(1, round(cfg.density * self.n))

    def warm_bytes(self) -> int:
        return SENSITIVITY_BYTES_PER_WEIGHT * self.n

    def state_bytes(self, cfg, warming: bool) -> int:
        """Estimated device memory of one account's state, and while it warms up its sensitivity sums."""
        return DEVICE_BYTES_PER_ENTRY * self.entries(cfg) + (self.warm_bytes() if warming else 0)

    def device_bytes(self, user) -> int:
        """What `user` holds on the device now: its state if there, its sensitivity sums if warming."""
        on = id(user) in self.last_used
        return (DEVICE_BYTES_PER_ENTRY * user.state.k if on else 0) + (self.warm_bytes() if user.sens else 0)

    def fits(self, cfg, resident: list) -> bool:
        """Admission. Paging: the states of all resident accounts fit in host memory (the device
        budget is kept by paging). No paging: everything stays on the device, warm-ups included."""
        if self.paging:
            held = sum(HOST_BYTES_PER_ENTRY * self.entries(u.job.cfg) for u in resident)
            return held + HOST_BYTES_PER_ENTRY * self.entries(cfg) <= self.host_budget
        if self.device_budget is None:
            return True
        used = sum(self.state_bytes(u.job.cfg, u.pending is not None and u.pending[0] == "select") for u in resident)
        return used + self.state_bytes(cfg, warming=True) <= self.device_budget

    def max_warming(self) -> int:
        """How many accounts may warm up at once (each holds dense sensitivity sums): half the
        device budget when paging, so trained states keep the other half."""
        if not self.paging:
            return 1 << 30
        return max(1, (self.device_budget // 2) // self.warm_bytes())

    # -- placement ------------------------------------------------------------------------------
    def admitted(self, user) -> None:
        self.last_used[id(user)] = self.clock

    def retired(self, user) -> None:
        self.last_used.pop(id(user), None)

    def prepare(self, picked: list, resident: list) -> None:
        """Bring the micro-batch's accounts onto the device; page others out while over budget."""
        self.clock += 1
        ids = {id(u) for u in picked}
        for u in picked:
            if id(u) not in self.last_used:
                u.state.page(self.device)
                self.stats["paged_in"] += 1
            self.last_used[id(u)] = self.clock
        if self.paging:
            starting = sum(self.warm_bytes() for u in picked if not u.sens and u.pending and u.pending[0] == "select")
            used = sum(self.device_bytes(u) for u in resident) + starting  # sums this pass allocates
            victims = sorted((u for u in resident if id(u) in self.last_used and id(u) not in ids and not u.sens
                              and u.state.k), key=lambda u: self.last_used[id(u)])
            for u in victims:
                if used <= self.device_budget:
                    break
                used -= DEVICE_BYTES_PER_ENTRY * u.state.k
                u.state.page("cpu")
                del self.last_used[id(u)]
                self.stats["paged_out"] += 1
        on = sum(1 for u in resident if id(u) in self.last_used and u.state.k)
        held = sum(1 for u in resident if u.state.k)  # selected and training, wherever the state is
        self.stats["max_resident_with_state"] = max(self.stats["max_resident_with_state"], held)
        self.stats["max_states_on_device"] = max(self.stats["max_states_on_device"], on)
