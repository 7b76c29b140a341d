"""The delta registry: what the delta store (local or S3) holds, per account and version, and the
two operations that change what is served without training: rollback and garbage collection.

Layout (sparse/delta_store.py): {store}/{account}/{version}/manifest.json, delta.safetensors,
_COMPLETE; {store}/{account}/LATEST names the served version. Rollback rewrites LATEST (one
object write: readers see the old pointer or the new one) to an older complete version; serving
replicas pick it up with their next LATEST check, as they do a new publish. GC deletes complete
versions beyond the newest N and never the one LATEST names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tkllm_ray.data.schema import validate_account_id
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import exists, join, list_dirs, read_bytes, read_latest, remove, write_text
from tkllm_ray.storage.publish import LATEST


@dataclass
class VersionInfo:
    account: str
    version: str
    latest: bool
    manifest: dict

    def row(self) -> dict:
        m = self.manifest
        return {"account": self.account, "version": self.version, "latest": self.latest,
                "created_at": m.get("created_at"), "method": m.get("method"), "density": m.get("density"),
                "entries": m.get("entries"), "base_model": m.get("base_model"),
                "base_fingerprint": m.get("base_fingerprint"), "data_watermark": m.get("data_watermark"),
                "run_id": m.get("run_id"), "eval_ppl_after": (m.get("metrics") or {}).get("eval_ppl_after")}


def accounts(store: str, options=None) -> list[str]:
    """Accounts with at least one published delta."""
    return [a for a in list_dirs(store, options) if exists(join(store, a, LATEST), options)]


def versions(store: str, account: str, options=None) -> list[VersionInfo]:
    """The account's complete versions, oldest first (version ids sort by time)."""
    root = join(store, validate_account_id(account))
    latest = read_latest(root, options)
    out = []
    for name in list_dirs(root, options):
        if exists(join(root, name, "_COMPLETE"), options) and exists(join(root, name, "manifest.json"), options):
            manifest = json.loads(read_bytes(join(root, name, "manifest.json"), options))
            out.append(VersionInfo(account, name, name == latest, manifest))
    if not out:
        raise TkllmError(f"no published delta for account {account!r} under {store}")
    return out


def show(store: str, account: str, version: str | None = None, options=None) -> VersionInfo:
    """One version (default: the one LATEST names)."""
    found = versions(store, account, options)
    want = version or read_latest(join(store, account), options)
    for v in found:
        if v.version == want:
            return v
    what = f"version {want!r}" if version else f"LATEST's version {want!r}"
    raise TkllmError(f"account {account!r} has no complete {what}; "
                     f"complete versions: {', '.join(v.version for v in found)}")


def rollback(store: str, account: str, version: str | None = None, options=None) -> tuple[str, str]:
    """Point LATEST at `version`, or by default at the complete version published before the
    current one. Returns (from, to)."""
    found = versions(store, account, options)
    current = next((i for i, v in enumerate(found) if v.latest), None)
    if current is None:
        raise TkllmError(f"account {account!r}: LATEST names no complete version; give the version to restore")
    if version is None:
        if current == 0:
            raise TkllmError(f"account {account!r}: {found[0].version} is its oldest version, nothing to roll back to")
        target = found[current - 1].version
    else:
        target = show(store, account, version, options).version
    write_text(join(store, account, LATEST), target, options)
    return found[current].version, target


def gc(store: str, keep: int, accounts_: list[str] | None = None, dry_run: bool = False, options=None) -> dict[str, list[str]]:
    """Delete each account's complete versions beyond its newest `keep` (the LATEST one always
    stays, newest or not). Returns {account: versions deleted (or to delete, when dry_run)}."""
    if keep < 1:
        raise TkllmError(f"keep must be at least 1 (got {keep}): the served version always stays")
    out = {}
    for account in accounts_ if accounts_ is not None else accounts(store, options):
        found = versions(store, account, options)
        doomed = [v.version for v in found[:-keep] if not v.latest]
        if not dry_run:
            for name in doomed:
                remove(join(store, account, name), options)
        out[account] = doomed
    return out
