"""Versioned, atomic publishing: `{root}/{version}/...` is written first, `{root}/LATEST` last.

A version directory is invisible to readers until the one-object write of LATEST names it, so a
reader during a publish resolves either the previous version or the new one, never a partial
one (the same rule on local disk and S3). The delta store uses the same layout.
"""

from __future__ import annotations

import secrets
import time
from typing import Callable

from tkllm_ray.config.storage import StorageOptions
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage.files import exists, join, read_text, write_text

LATEST = "LATEST"
VERSION_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzTZ-")


def new_version_id() -> str:
    """Sortable by time, unique across concurrent writers: 20261123T133000Z-4f9a1c."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def publish(
    root: str,
    write_version: Callable[[str], None],
    version: str | None = None,
    options: StorageOptions | None = None,
) -> str:
    """Call `write_version(version_uri)` to fill a fresh version, then point LATEST at it."""
    version = version or new_version_id()
    _check_version(version)
    target = join(root, version)
    if exists(join(target, "_COMPLETE"), options):
        raise TkllmError(f"version {version} already exists under {root}: versions are immutable")
    write_version(target)
    write_text(join(target, "_COMPLETE"), version, options)
    write_text(join(root, LATEST), version, options)
    return version


def read_latest(root: str, options: StorageOptions | None = None) -> str | None:
    """The published version under `root`, or None if nothing was published yet."""
    uri = join(root, LATEST)
    if not exists(uri, options):
        return None
    version = read_text(uri, options).strip()
    _check_version(version)
    return version


def resolve_latest(root: str, options: StorageOptions | None = None) -> str:
    """URI of the latest published version under `root`, or `root` itself if it names one
    complete version. A version still being written is never returned."""
    version = read_latest(root, options)
    if version is None:
        if exists(join(root, "_COMPLETE"), options):
            return root
        raise TkllmError(f"nothing published at {root} (run the job that writes it first)")
    return join(root, version)


def _check_version(version: str) -> None:
    if not version or not set(version) <= VERSION_CHARS or len(version) > 64:
        raise TkllmError(f"invalid version id {version!r}: use [0-9a-z-TZ], at most 64 characters")
