"""The order of work for one account's fine-tune, as events: every path (one account alone, or
packed with thousands) follows the same sequence drawn from the same seeded generator, which is
what makes a packed run's delta equal the one the account would get alone.

Events: ("select", warm-up batches) — GSPF's sensitivity pass + selection, at the start and every
`reselect_every` epochs; ("fixed_mask", None) — DiffPruning's projection; ("step", batch).
"""

from __future__ import annotations

from typing import Iterator

import torch


def batches(ids: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator):
    """One epoch: the rows in a fresh random order, `batch_size` at a time."""
    order = torch.randperm(ids.shape[0], generator=gen)
    for s in range(0, len(order), batch_size):
        sel = order[s : s + batch_size].to(ids.device)
        yield ids[sel], labels[sel]


def cycle(ids, labels, batch_size, gen):
    while True:
        yield from batches(ids, labels, batch_size, gen)


def events(cfg, ids: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> Iterator[tuple[str, object]]:
    def warm():  # the sensitivity warm-up: warmup_steps batches, cycling if the data is short
        return [b for _, b in zip(range(cfg.warmup_steps), cycle(ids, labels, cfg.batch_size, gen))]

    if cfg.method == "gspf":
        yield "select", warm()
    for epoch in range(cfg.epochs):
        if cfg.method == "gspf" and cfg.reselect_every and epoch and epoch % cfg.reselect_every == 0:
            yield "select", warm()
        if cfg.method == "diffpruning" and epoch == cfg.epochs - cfg.diffpruning_mask_epochs:
            yield "fixed_mask", None
        for batch in batches(ids, labels, cfg.batch_size, gen):
            yield "step", batch


def total_steps(cfg, rows: int) -> int:
    return cfg.epochs * -(-rows // cfg.batch_size)
