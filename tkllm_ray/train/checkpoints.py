"""Per-account training checkpoints of the packed engine (train/packed.py)."""

from __future__ import annotations

import io

import torch

from tkllm_ray.storage import exists, join, read_bytes, remove, write_bytes


class UserCheckpoints:
    """Per-account training checkpoints under `root` (path or s3://): taken between steps, so a
    restarted worker resumes an in-flight account where it was instead of from scratch."""

    def __init__(self, root: str, every: int, options=None, run_id: str | None = None):
        self.root, self.every, self.options, self.run_id = root, every, options, run_id

    def _uri(self, account: str) -> str:
        return join(self.root, account, "state.pt")

    def save(self, user) -> None:
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
