"""What every benchmark script shares: results written as <prefix>-<device slug>.json, and a
device sync around timed work (a no-op on the CPU)."""

from __future__ import annotations

import json
import os

import torch


def write_result(out_dir: str, prefix: str, device: str, result: dict) -> str:
    """Write `result` to <out_dir>/<prefix>-<device as a slug>.json; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")
    path = os.path.join(out_dir, f"{prefix}-{slug}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
