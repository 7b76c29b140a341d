"""Held-out perplexity on a sharded base (packed engine, lockstep mode).

Unsharded, the engine evaluates an account on the exact path: its delta scattered into the weights,
the base restored bit-exactly afterwards (PackedGSPF.perplexity). A ZeRO-3 base has no full weights
to scatter into, and every forward is a collective; so here evaluations queue up as row chunks, and
in each round every worker runs as many forwards as the busiest one needs. A forward mixes several
accounts' chunks, each through its own delta via the segmented op, as training does (no delta: the
base's perplexity before training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tkllm_ray.train.data import pack


@dataclass
class _Chunk:
    user: object
    key: str
    entries: dict  # module -> (indices, values) on the device; {} for the base alone
    ids: torch.Tensor
    labels: torch.Tensor


class LockstepEval:
    def __init__(self, engine):
        self.engine = engine
        self.chunks: list[_Chunk] = []
        self.sums: dict[tuple[int, str], list] = {}  # (id(user), key) -> [nll sum, tokens, chunks left]
        self.finished: list = []  # trained users whose evaluations are all done

    def add(self, user, key: str, delta: dict | None) -> None:
        cfg, dev = user.job.cfg, self.engine.device
        ids, labels = (t.to(dev) for t in pack(user.job.eval_posts, self.engine.eos_id, cfg.seq_len))
        entries = {n: (i.to(dev), v.to(dev, torch.float32)) for n, (i, v) in (delta or {}).items()}
        n = 0
        for s in range(0, ids.shape[0], cfg.batch_size):
            self.chunks.append(_Chunk(user, key, entries, ids[s : s + cfg.batch_size], labels[s : s + cfg.batch_size]))
            n += 1
        self.sums[(id(user), key)] = [0.0, 0, n]
        if n == 0:
            self._close(user, key)

    def _batches(self) -> list[list[_Chunk]]:
        """The queue cut into forwards of at most max_rows rows (a chunk larger than that alone)."""
        out, rows = [], 0
        for c in self.chunks:
            if not out or rows + c.ids.shape[0] > self.engine.max_rows:
                out.append([])
                rows = 0
            out[-1].append(c)
            rows += c.ids.shape[0]
        return out

    def forwards_due(self) -> int:
        return len(self._batches())

    def run(self, forwards: int) -> list:
        """`forwards` forwards (idle ones once this worker's queue is empty); returns the users
        whose evaluations are all done."""
        batches = self._batches()
        self.chunks = []
        for i in range(forwards):
            self._forward(batches[i]) if i < len(batches) else self._idle()
        done, self.finished = self.finished, []
        return done

    @torch.no_grad()
    def _forward(self, chunks: list[_Chunk]) -> None:
        from tkllm_ray.train.packed import BatchContext

        eng = self.engine
        eng.model.eval()
        with eng.batch(BatchContext([], [c.ids.numel() for c in chunks], False, entries=[c.entries for c in chunks],
                                    always=True)):
            logits = eng.model(input_ids=torch.cat([c.ids for c in chunks])).logits
        r0 = 0
        for c in chunks:
            n = c.ids.shape[0]
            lg, lab = logits[r0 : r0 + n, :-1].float(), c.labels[:, 1:]
            r0 += n
            total = self.sums[(id(c.user), c.key)]
            total[0] += float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lab.reshape(-1), ignore_index=-100,
                                              reduction="sum"))
            total[1] += int((lab != -100).sum())
            total[2] -= 1
            if total[2] == 0:
                self._close(c.user, c.key)

    def _close(self, user, key: str) -> None:
        nll, tokens, _ = self.sums.pop((id(user), key))
        user.ppl[key] = math.exp(nll / max(tokens, 1))
        if "after" in user.ppl and not any(k[0] == id(user) for k in self.sums):
            self.finished.append(user)  # (a "before" alone: the account still trains)

    @torch.no_grad()
    def _idle(self) -> None:
        ids, ctx = self.engine.idle_batch()
        with self.engine.batch(ctx):
            self.engine.model(input_ids=ids)
