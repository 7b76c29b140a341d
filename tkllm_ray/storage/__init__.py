"""URI-addressed storage. The only place in the code base that knows local disk from S3."""

from tkllm_ray.storage.files import (
    exists,
    filesystem_for,
    is_dir,
    join,
    list_dirs,
    list_files,
    read_bytes,
    read_hashed,
    read_text,
    remove,
    write_bytes,
    write_dir,
    write_text,
)
from tkllm_ray.storage.publish import new_version_id, publish, read_latest, resolve_latest
from tkllm_ray.storage.uri import ParsedUri, parse_uri

__all__ = [
    "ParsedUri",
    "exists",
    "filesystem_for",
    "is_dir",
    "join",
    "list_dirs",
    "list_files",
    "new_version_id",
    "parse_uri",
    "publish",
    "read_bytes",
    "read_hashed",
    "read_latest",
    "read_text",
    "remove",
    "resolve_latest",
    "write_bytes",
    "write_dir",
    "write_text",
]
