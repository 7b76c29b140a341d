import threading

import pytest

from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import join, list_files, publish, read_latest, read_text, resolve_latest, write_text
from tkllm_ray.storage.uri import parse_uri


def _writer(n_files: int, tag: str):
    def write(vuri):
        for i in range(n_files):
            write_text(join(vuri, f"part-{i:03d}.txt"), tag)
    return write


def _check_reader_never_sees_partial(root, opts, rounds):
    """A reader loops while versions are published; every version it resolves must be whole."""
    seen, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                v = resolve_latest(root, opts)
            except TkllmError:
                continue  # nothing published yet
            files = [f for f in list_files(v, opts) if "part-" in f]
            tags = {read_text(f, opts) for f in files}
            if len(files) != 20 or len(tags) != 1:
                errors.append((v, len(files), tags))
            seen.append(v)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for r in range(rounds):
            publish(root, lambda vuri, r=r: [write_text(join(vuri, f"part-{i:03d}.txt"), f"v{r}", opts)
                                           for i in range(20)], version=f"v{r:03d}", options=opts)
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert seen, "the reader never got to read"
    assert read_latest(root, opts) == f"v{rounds - 1:03d}"


def test_reader_during_publish_sees_old_or_new_local(tmp_path):
    _check_reader_never_sees_partial(str(tmp_path / "ds"), None, rounds=15)


@pytest.mark.s3
def test_reader_during_publish_sees_old_or_new_s3(s3_server, s3_bucket):
    _check_reader_never_sees_partial(f"s3://{s3_bucket}/ds", s3_server.options(), rounds=5)


def test_crashed_writer_leaves_nothing_visible(tmp_path):
    root = str(tmp_path / "ds")
    publish(root, _writer(3, "good"), version="v1")

    def crash(vuri):
        write_text(join(vuri, "part-000.txt"), "half")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        publish(root, crash, version="v2")
    assert read_latest(root) == "v1"
    assert read_text(join(resolve_latest(root), "part-000.txt")) == "good"


def test_versions_are_immutable_and_ids_validated(tmp_path):
    root = str(tmp_path / "ds")
    publish(root, _writer(1, "a"), version="v1")
    with pytest.raises(TkllmError, match="already exists"):
        publish(root, _writer(1, "b"), version="v1")
    with pytest.raises(TkllmError, match="invalid version id"):
        publish(root, _writer(1, "b"), version="../escape")


def test_unpublished_root_is_a_clear_error(tmp_path):
    with pytest.raises(TkllmError, match="nothing published"):
        resolve_latest(str(tmp_path / "missing"))


def test_uri_parsing():
    assert parse_uri("s3://bucket/a/b/").path == "bucket/a/b"
    assert parse_uri("file:///tmp/x").path == "/tmp/x"
    with pytest.raises(TkllmError, match="unsupported storage scheme"):
        parse_uri("gs://bucket/x")
    with pytest.raises(TkllmError, match="names no bucket"):
        parse_uri("s3://")
    assert join("s3://b/p", "x", "y.txt") == "s3://b/p/x/y.txt"
