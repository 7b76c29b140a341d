import hashlib

import pytest

from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import (exists, join, list_files, read_bytes, read_hashed, read_text, remove, write_bytes,
                               write_text)

pytestmark = pytest.mark.s3


def test_roundtrip_and_listing_on_real_s3(s3_server, s3_bucket):
    opts = s3_server.options()
    root = f"s3://{s3_bucket}/prefix"
    write_bytes(join(root, "a/x.bin"), b"\x00\x01payload", opts)
    write_text(join(root, "b.txt"), "héllo 🔥", opts)
    write_text(join(root, "_hidden"), "skip me", opts)
    assert read_bytes(join(root, "a/x.bin"), opts) == b"\x00\x01payload"
    buf, digest = read_hashed(join(root, "a/x.bin"), opts, chunk=3)  # Arrow's stream, in chunks
    assert bytes(buf) == b"\x00\x01payload" and digest == hashlib.sha256(b"\x00\x01payload").hexdigest()
    assert read_text(join(root, "b.txt"), opts) == "héllo 🔥"
    assert list_files(root, opts) == [f"{root}/a/x.bin", f"{root}/b.txt"]
    # The object really is in the server, as boto3 sees it.
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="prefix/b.txt")["Body"].read()
    assert body.decode() == "héllo 🔥"
    remove(join(root, "b.txt"), opts)
    assert not exists(join(root, "b.txt"), opts)


def test_missing_object_and_prefix_give_clear_errors(s3_server, s3_bucket):
    opts = s3_server.options()
    with pytest.raises(TkllmError, match="no such object"):
        read_bytes(f"s3://{s3_bucket}/nope.bin", opts)
    with pytest.raises(TkllmError, match="no such object"):
        read_hashed(f"s3://{s3_bucket}/nope.bin", opts)
    with pytest.raises(TkllmError, match="no such file or directory"):
        list_files(f"s3://{s3_bucket}/no/such/prefix", opts)


def test_wrong_credentials_are_refused(s3_server, s3_bucket):
    bad = s3_server.options().model_copy(update={"secret_access_key": "wrong"})
    with pytest.raises(Exception):
        write_bytes(f"s3://{s3_bucket}/x", b"1", bad)


def test_s3_prefix_is_cached_as_a_local_dir(s3_server, s3_bucket, tmp_path, monkeypatch):
    from tkllm_ray.data.tokenizer import BUILTIN_DIR, load_tokenizer
    from tkllm_ray.storage import cache

    monkeypatch.setattr(cache, "CACHE_ROOT", tmp_path)
    opts = s3_server.options()
    for f in BUILTIN_DIR.iterdir():
        write_bytes(f"s3://{s3_bucket}/tok/{f.name}", f.read_bytes(), opts)
    tok = load_tokenizer(f"s3://{s3_bucket}/tok", opts)
    assert tok("hi 🔥")["input_ids"] == load_tokenizer("builtin")("hi 🔥")["input_ids"]
    with pytest.raises(TkllmError, match="model directory not found: /no/such/model"):
        cache.local_dir("/no/such/model", "model directory")
