"""Local directories for things loaders need on disk (tokenizers, Hugging Face model dirs):
a local path is checked and used as is; an s3:// prefix is copied once into a local cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tkllm_ray.errors import TkllmError
from tkllm_ray.storage.files import list_files, read_bytes
from tkllm_ray.storage.uri import parse_uri

CACHE_ROOT = Path(os.environ.get("TKLLM_CACHE", Path.home() / ".cache" / "tkllm"))


def local_dir(uri: str, what: str = "directory", options=None) -> str:
    p = parse_uri(uri)
    if not p.is_s3:
        if not os.path.isdir(p.path):
            raise TkllmError(f"{what} not found: {uri} (give a local directory or an s3:// prefix)")
        return p.path
    dest = CACHE_ROOT / "s3" / hashlib.sha1(uri.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():  # marker written last: a half-copied dir is redone
        dest.mkdir(parents=True, exist_ok=True)
        base = uri.rstrip("/") + "/"
        for f in list_files(uri, options):
            target = dest / f[len(base):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(f, options))
        (dest / ".complete").write_text(uri)
    return str(dest)
