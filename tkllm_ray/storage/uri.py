"""Parse storage URIs: plain paths, file:// and s3://bucket/prefix."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from tkllm_ray.errors import TkllmError


@dataclass(frozen=True)
class ParsedUri:
    scheme: str  # "file" or "s3"
    path: str  # absolute local path, or "bucket/key" for s3

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def uri(self) -> str:
        return f"s3://{self.path}" if self.is_s3 else self.path


def parse_uri(uri: str) -> ParsedUri:
    if not isinstance(uri, str) or not uri.strip():
        raise TkllmError("empty storage location: give a path, file:// or s3://bucket/prefix URI")
    uri = uri.strip()
    if uri.startswith("s3://"):
        rest = uri[len("s3://") :].strip("/")
        if not rest:
            raise TkllmError(f"S3 URI {uri!r} names no bucket: use s3://bucket/prefix")
        return ParsedUri("s3", rest)
    if uri.startswith("file://"):
        return ParsedUri("file", os.path.abspath(unquote(urlparse(uri).path)))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise TkllmError(f"unsupported storage scheme {scheme!r} in {uri!r}: use a path, file:// or s3://")
    return ParsedUri("file", os.path.abspath(os.path.expanduser(uri)))
