"""The buckets a prefill is captured in as a CUDA graph (serve/engine.py), and the buffers such a
graph reads: a batch of prompts is padded to its bucket's rows and width and copied into them."""

from __future__ import annotations

import torch


# Prompt widths of a prefill graph's bucket: multiples of 16 (the delta kernel's aligned gathers),
# about 1.5x apart, so padding costs at most ~1.5x the tokens and a few dozen graphs cover any mix.
_WIDTHS = [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]


def prefill_bucket(requests: int, width: int, slots: int, max_len: int) -> tuple[int, int]:
    """(rows, prompt width) of the prefill graph for `requests` prompts of up to `width` tokens:
    the next power of two (at most `slots`) and the next width of _WIDTHS (at most max_len)."""
    if not 1 <= requests <= slots or not 1 <= width <= max_len:
        raise ValueError(f"a prefill of {requests} prompts of {width} tokens does not fit {slots} slots of "
                         f"{max_len} tokens")
    return min(1 << (requests - 1).bit_length(), slots), min(next((w for w in _WIDTHS if w >= width), max_len), max_len)


class PrefillGraph:
    """A prefill bucket's CUDA graph and the buffers it reads: token ids (rows, tokens), each row's
    slot (its KV row and its delta's slot in the pool) and prompt length; `out`: its logits a row."""

    def __init__(self, rows: int, tokens: int, device: torch.device):
        self.ids = torch.zeros(rows, tokens, dtype=torch.long, device=device)
        self.slots, self.lens = (torch.zeros(rows, dtype=torch.long, device=device) for _ in range(2))
        self.graph, self.out, self.ctx = None, None, None

    def fill(self, ids: torch.Tensor, slots: list[int], lens: torch.Tensor, pad_id: int, spare: int) -> None:
        """The batch's rows first; padding rows: pad tokens in slot `spare` (the KV cache's spare
        row, the pool's empty run), length 1."""
        rows, tokens = self.ids.shape
        n, width = ids.shape
        host = torch.full((rows, tokens), pad_id, dtype=torch.long)
        host[:n, :width] = ids
        meta = torch.stack([torch.tensor(slots + [spare] * (rows - n)),
                            torch.cat([lens, torch.ones(rows - n, dtype=lens.dtype)])])
        self.ids.copy_(host, non_blocking=True)
        for dst, src in zip((self.slots, self.lens), meta):
            dst.copy_(src, non_blocking=True)
