"""read_hashed: an object's bytes in one writable buffer and their sha256, the hash computed
chunk by chunk beside the read."""

import hashlib
import os

import pytest

from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import read_hashed


@pytest.mark.parametrize("size", [0, 1, 100, 4096 + 3])
def test_bytes_and_sha256_of_a_local_file_in_any_number_of_chunks(tmp_path, size):
    data = os.urandom(size)
    path = tmp_path / "x.bin"
    path.write_bytes(data)
    for chunk in (7, 4096, 1 << 20):  # several chunks, a chunk and a remainder, one chunk
        buf, digest = read_hashed(str(path), chunk=chunk)
        assert isinstance(buf, bytearray) and bytes(buf) == data
        assert digest == hashlib.sha256(data).hexdigest()


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TkllmError, match="no such object"):
        read_hashed(str(tmp_path / "nope.bin"))
