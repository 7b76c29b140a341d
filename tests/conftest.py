import copy
import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tkllm_ray.data.samples import shared_data_dir


@pytest.fixture(scope="session")
def s3_server():
    from tkllm_ray.storage.local_s3 import start_s3_server

    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    name = "t-" + uuid.uuid4().hex[:10]
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def ray_local():
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data():
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is absent (set TKLLM_SHARED_DATA to run this test)")
    return d


@pytest.fixture(scope="session")
def benchmark_script():
    """Load benchmarks/<name>.py as a module (benchmarks/ is scripts, not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")])])
def kernel_check(request):
    """Run a kernel check script (a format string with {device}, printing "ok" at the end) on the
    CPU through Triton's interpreter, which is how CI holds the GPU kernels to their torch
    references, and on a real GPU where one is present. The interpreter runs in a fresh process:
    its switch is read when triton is imported."""
    pytest.importorskip("triton")

    def run(code: str) -> None:
        if request.param == "cuda":
            # In this process: what a check rebinds in the kernel modules (tiles, forced routes,
            # sample sizes, functions it wraps) and the tile table it edits go back afterwards,
            # else later tests would run with them (e.g. train through a dense route forced for
            # every batch, and fail their tolerances).
            from tkllm_ray.sparse import segmented_dense, segmented_triton, selection, selection_triton

            modules = (segmented_dense, segmented_triton, selection, selection_triton)
            saved, tiles = [dict(vars(m)) for m in modules], copy.deepcopy(segmented_triton.CONFIG)
            try:
                exec(code.format(device="cuda"), {})
            finally:
                for m, attrs in zip(modules, saved):
                    for name, value in attrs.items():
                        setattr(m, name, value)
                segmented_triton.CONFIG.clear()
                segmented_triton.CONFIG.update(tiles)
            return
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        out = subprocess.run([sys.executable, "-c", code.format(device="cpu")], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().endswith("ok")

    return run


@pytest.fixture(scope="session")
def ingested_dataset():
    """Write synthetic accounts as `tkllm ingest` writes them (train/eval hive partitions with the
    builtin tokenizer's ids, published): fast enough for unit tests, no Ray."""

    def write_dataset(root: str, accounts: int, posts: int, train: int, seed: int = 3) -> tuple[str, list[str]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from tkllm_ray.data.synth import generate_records
        from tkllm_ray.data.tokenizer import cached_tokenizer
        from tkllm_ray.data.validate import RowRules, record_to_row
        from tkllm_ray.storage import join, publish

        tok = cached_tokenizer()
        rows = [record_to_row(r, "s", i, RowRules()) for i, r in enumerate(generate_records(accounts, posts, seed=seed))]
        by_acc: dict[str, list[dict]] = {}
        for r in rows:
            r["input_ids"] = tok(r["text"], add_special_tokens=False)["input_ids"]
            by_acc.setdefault(r["account_id"], []).append(r)
        cols = ("account_id", "text", "created_at", "position", "source", "source_row", "input_ids", "genre")

        def write(vuri):
            for split in ("train", "eval"):
                out = []
                for rs in by_acc.values():
                    rs.sort(key=lambda r: r["created_at"])
                    out += rs[:train] if split == "train" else rs[train:]
                pq.write_to_dataset(pa.Table.from_pylist([{k: r[k] for k in cols} for r in out]), join(vuri, split),
                                    partition_cols=["account_id"])

        publish(root, write)
        return root, sorted(by_acc)

    return write_dataset
