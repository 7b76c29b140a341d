"""Reads, writes and listings over pyarrow filesystems (local or S3), addressed by URI.

Single-object writes are atomic: on local disk the bytes go to a temporary sibling that is
renamed over the target; on S3 a PUT becomes visible whole or not at all.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import queue
import shutil
import threading
import uuid
from functools import lru_cache

import pyarrow.fs as pafs

from tkllm_ray.config.storage import StorageOptions
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage.uri import ParsedUri, parse_uri


def filesystem_for(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path for `uri` (pass both to Ray Data I/O)."""
    p = parse_uri(uri)
    if not p.is_s3:
        return pafs.LocalFileSystem(), p.path
    return _s3_filesystem((options or StorageOptions()).resolved()), p.path


def _s3_filesystem(opts: StorageOptions) -> pafs.S3FileSystem:
    return _s3_cached(opts.endpoint_url, opts.region, opts.access_key_id, opts.secret_access_key, opts.session_token)


@lru_cache(maxsize=16)
def _s3_cached(endpoint, region, key, secret, token) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    # Without explicit keys pyarrow uses the AWS default chain (profile, instance role).
    return pafs.S3FileSystem(**kwargs)


def join(uri: str, *parts: str) -> str:
    p = parse_uri(uri)
    clean = [s.strip("/") for s in parts if s and s.strip("/")]
    if p.is_s3:
        return "s3://" + posixpath.join(p.path, *clean)
    return os.path.join(p.path, *clean)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem_for(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = filesystem_for(uri, options)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem_for(uri, options)
    try:
        if isinstance(fs, pafs.LocalFileSystem):  # one read into bytes, not Arrow's buffer and a copy
            with open(path, "rb") as f:
                return f.read()
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise TkllmError(f"no such object: {uri}") from None
    except OSError as e:
        if "NoSuchKey" in str(e) or "not found" in str(e).lower():
            raise TkllmError(f"no such object: {uri}") from None
        raise


def read_hashed(uri: str, options: StorageOptions | None = None, chunk: int = 4 << 20) -> tuple[bytearray, str]:
    """The object's bytes, in one writable buffer (a reader can view tensors in it without a copy),
    and their sha256. The hash runs on a second thread over each chunk as soon as it is read
    (hashlib releases the GIL), so hashing overlaps the read instead of following it."""
    fs, path = filesystem_for(uri, options)
    local = isinstance(fs, pafs.LocalFileSystem)
    try:
        size = os.stat(path).st_size if local else fs.get_file_info(path).size
        if size is None:
            raise FileNotFoundError(path)
        f = open(path, "rb", buffering=0) if local else fs.open_input_stream(path)
    except FileNotFoundError:
        raise TkllmError(f"no such object: {uri}") from None
    buf = bytearray(size)
    view, digest, parts = memoryview(buf), hashlib.sha256(), queue.SimpleQueue()

    def hash_parts():
        while (part := parts.get()) is not None:
            digest.update(part)

    hasher = threading.Thread(target=hash_parts, daemon=True)
    hasher.start()
    at = 0
    try:
        with f:
            while at < size:
                end = min(size, at + chunk)
                if local:
                    n = f.readinto(view[at:end])
                else:  # Arrow's stream hands out its own buffers: one copy a chunk
                    piece = f.read(end - at)
                    n = len(piece)
                    view[at:at + n] = piece
                if not n:
                    break
                parts.put(view[at:at + n])
                at += n
    finally:
        parts.put(None)
        hasher.join()
    if at != size:
        raise OSError(f"{uri}: read {at} of {size} bytes (changed while being read?)")
    return buf, digest.hexdigest()


def read_text(uri: str, options: StorageOptions | None = None) -> str:
    return read_bytes(uri, options).decode("utf-8")


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write one object atomically: readers see the old content or the new, never a prefix."""
    p = parse_uri(uri)
    fs, path = filesystem_for(uri, options)
    if p.is_s3:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(uri: str, text: str, options: StorageOptions | None = None) -> None:
    write_bytes(uri, text.encode("utf-8"), options)


def list_files(uri: str, options: StorageOptions | None = None) -> list[str]:
    """All files under `uri` (recursively) as URIs, sorted; `uri` itself if it is a file.
    Hidden and underscore-prefixed names (`_SUCCESS`, `.crc`, temp files) are skipped."""
    p = parse_uri(uri)
    fs, path = filesystem_for(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise TkllmError(f"no such file or directory: {uri} (check the path; for S3 the bucket and prefix)")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(i.path, path) if p.is_s3 else os.path.relpath(i.path, path)
        if any(part.startswith((".", "_")) or ".tmp-" in part for part in rel.split(os.sep if not p.is_s3 else "/")):
            continue
        out.append(_to_uri(p, i.path))
    return sorted(out)


def list_dirs(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Names of the directories (S3: common prefixes) right under `uri`, sorted; none if it is
    missing. Hidden, underscore-prefixed and temporary names are skipped, as in list_files."""
    fs, path = filesystem_for(uri, options)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                  and not i.base_name.startswith((".", "_")) and ".tmp-" not in i.base_name)


def _to_uri(p: ParsedUri, path: str) -> str:
    return f"s3://{path}" if p.is_s3 else path


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a whole directory/prefix; a missing target is not an error."""
    fs, path = filesystem_for(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def write_dir(local: str, uri: str, options: StorageOptions | None = None, last: tuple[str, ...] = ()) -> None:
    """Copy a local directory's files to `uri`. Local targets appear whole (built beside, then
    renamed into place; an existing target is an error); on S3, files named in `last` (e.g. a
    model's config.json) are written after everything else, so a loader never finds them early."""
    p = parse_uri(uri)
    if exists(uri, options):
        raise TkllmError(f"{uri} already exists: choose a new output directory")
    names = sorted((os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs),
                   key=lambda n: (os.path.basename(n) in last, n))
    if not p.is_s3:
        staging = f"{p.path.rstrip(os.sep)}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            shutil.copytree(local, staging)
            os.replace(staging, p.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    for name in names:
        with open(os.path.join(local, name), "rb") as f:
            write_bytes(join(uri, *name.split(os.sep)), f.read(), options)
