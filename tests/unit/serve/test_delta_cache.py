"""The serving delta cache: tiers under byte budgets, one store load per miss, clear errors per
account, and a new version picked up while the old one serves."""

import asyncio
import json
import threading

import pytest
import torch

from tkllm_ray.errors import TkllmError
from tkllm_ray.serve.delta_cache import DeltaCache, DeltaLoadError, UnknownAccount
from tkllm_ray.sparse.delta_store import save_delta

FP = "sha256:" + "ab" * 32


def _delta(seed: int, k: int = 500) -> dict:
    g = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randperm(64 * 64, generator=g)[:k]).values
    return {"model.layers.0.mlp.up_proj": (idx, torch.randn(k, generator=g))}


def _publish(store, account: str, seed: int, fp: str = FP, options=None) -> str:
    return save_delta(store, account, _delta(seed), "tkllm-tiny", fp, "gspf", 0.003, value_dtype="fp32",
                      options=options)


def _bytes() -> int:
    return 500 * 4 + 500 * 4  # int32 indices + fp32 values


def test_a_delta_loaded_encoded_gets_its_host_copy_from_the_device_and_never_an_older_one(tmp_path, monkeypatch):
    """With a GPU, the host tier's copy of a format-3 delta is made from the device's copy, in the
    background. A newer version's load drops the older host copy at once. A copy is kept even if
    the device tier no longer holds the delta when it is made. (The GPU's path, run on the CPU:
    a clone stands in for the pinned copy.)"""
    from tkllm_ray.serve import delta_cache

    monkeypatch.setattr(delta_cache, "_pinned", lambda t: t.clone())
    store = str(tmp_path / "deltas")
    v1 = _publish(store, "a1", seed=1)
    cache = DeltaCache(store, base_fingerprint=FP, loader_threads=1)  # one thread: its queue runs in order
    cache.pin = True

    def settled():  # every background copy queued so far has run
        cache._pool.submit(lambda: None).result()

    hot = cache.get("a1")
    settled()
    assert cache.host.items["a1"].version == v1 and cache.host.items["a1"].flat[0] is not hot.flat[0]
    v2 = _publish(store, "a1", seed=2)
    go, copy_may_run = threading.Event(), threading.Event()
    cache._pool.submit(go.wait)
    [fut] = cache.refresh()  # queued behind `go`
    cache._pool.submit(copy_may_run.wait)  # v2's host copy gets queued behind this: look in between
    go.set()
    fut.result()
    assert "a1" not in cache.host.items  # v1's copy dropped at once; v2's is queued
    copy_may_run.set()
    settled()
    assert cache.host.items["a1"].version == v2 and cache.hot.items["a1"].version == v2
    cache.close()

    _publish(store, "a2", seed=3)
    small = DeltaCache(store, base_fingerprint=FP, device_budget=1, loader_threads=1)  # the device keeps nothing
    small.pin = True
    small.get("a2")
    small._pool.submit(lambda: None).result()
    assert "a2" not in small.hot.items and "a2" in small.host.items
    small.get("a2")
    assert small.stats["host_hits"] == 1 and small.stats["store_loads"] == 1
    small.close()


def test_tiers_evict_lru_and_promote_from_host(tmp_path):
    store = str(tmp_path / "deltas")
    for a in ("a1", "a2", "a3"):
        _publish(store, a, seed=int(a[1]))
    cache = DeltaCache(store, device_budget=2 * _bytes(), host_budget=3 * _bytes(), base_fingerprint=FP)
    got = {a: cache.get(a) for a in ("a1", "a2", "a3")}  # a1 falls out of the hot tier
    assert list(cache.hot.items) == ["a2", "a3"] and list(cache.host.items) == ["a1", "a2", "a3"]
    assert cache.stats["store_loads"] == 3 and cache.stats["evictions"] == 1
    again = cache.get("a1")  # from host memory, not the store
    assert cache.stats["host_hits"] == 1 and cache.stats["store_loads"] == 3
    assert list(cache.hot.items) == ["a3", "a1"]
    idx, vals = _delta(1)["model.layers.0.mlp.up_proj"]
    i, v = again.delta["model.layers.0.mlp.up_proj"]
    assert i.dtype == torch.int32 and torch.equal(i.long(), idx) and torch.equal(v, vals)
    assert cache.get("a3") is got["a3"] and cache.stats["hits"] == 1
    cache.close()


def test_concurrent_requests_for_one_account_share_one_load(tmp_path):
    store = str(tmp_path / "deltas")
    _publish(store, "a1", seed=1)
    cache = DeltaCache(store, base_fingerprint=FP)

    async def many():
        return await asyncio.gather(*(cache.aget("a1") for _ in range(8)))

    items = asyncio.run(many())
    assert cache.stats["store_loads"] == 1 and all(it.version == items[0].version for it in items)
    cache.close()


def test_bad_accounts_fail_alone_with_clear_errors(tmp_path):
    store = str(tmp_path / "deltas")
    _publish(store, "good", seed=1)
    v = _publish(store, "corrupt", seed=2)
    (tmp_path / "deltas" / "corrupt" / v / "delta.safetensors").write_bytes(b"not a delta")
    _publish(store, "other_base", seed=3, fp="sha256:" + "cd" * 32)
    v = _publish(store, "bad_manifest", seed=4)
    (tmp_path / "deltas" / "bad_manifest" / v / "manifest.json").write_text("{")
    cache = DeltaCache(store, base_fingerprint=FP)
    with pytest.raises(UnknownAccount, match="unknown account 'nobody': no delta is published"):
        cache.get("nobody")
    with pytest.raises(DeltaLoadError, match="account 'corrupt': .*corrupt \\(sha256 mismatch\\)"):
        cache.get("corrupt")
    with pytest.raises(DeltaLoadError, match="account 'other_base': .*trained on base"):
        cache.get("other_base")
    with pytest.raises(DeltaLoadError, match="account 'bad_manifest': its delta cannot be read"):
        cache.get("bad_manifest")
    with pytest.raises(TkllmError, match="invalid account id '../escape'"):
        cache.get("../escape")
    assert cache.get("good").account == "good" and cache.stats["load_errors"] == 3
    cache.close()


def test_a_new_version_loads_in_the_background_and_then_serves(tmp_path):
    store = str(tmp_path / "deltas")
    v1 = _publish(store, "a1", seed=1)
    cache = DeltaCache(store, base_fingerprint=FP)
    assert cache.get("a1").version == v1
    assert cache.refresh() == []  # nothing new
    v2 = _publish(store, "a1", seed=9)
    futures = cache.refresh()
    assert len(futures) == 1
    futures[0].result(timeout=30)
    item = cache.get("a1")
    assert item.version == v2 and cache.stats["swaps"] == 1
    assert torch.equal(item.delta["model.layers.0.mlp.up_proj"][1], _delta(9)["model.layers.0.mlp.up_proj"][1])
    assert json.loads((tmp_path / "deltas" / "a1" / v2 / "manifest.json").read_text())["parent_version"] == v1
    cache.close()


@pytest.mark.s3
def test_loads_from_s3(s3_server, s3_bucket):
    store, opts = f"s3://{s3_bucket}/deltas", s3_server.options()
    v = _publish(store, "a1", seed=1, options=opts)
    cache = DeltaCache(store, base_fingerprint=FP, options=opts)
    assert cache.get("a1").version == v and cache.stats["store_loads"] == 1
    cache.close()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_deltas_that_do_not_fit_the_served_base_are_refused(tmp_path, device):
    """(The entries are checked where the delta lands: on a GPU, after its copy there.)"""
    store = str(tmp_path / "deltas")
    name = "model.layers.0.mlp.up_proj"
    idx = torch.tensor([5, 3, 9])
    with pytest.raises(ValueError, match="must be sorted and unique within each module"):  # refused by the writer
        save_delta(store, "unsorted", {name: (idx, torch.ones(3))}, "tkllm-tiny", FP, "gspf", 0.003)
    # and by the reader, in the format before, which could hold them
    save_delta(store, "unsorted", {name: (idx, torch.ones(3))}, "tkllm-tiny", FP, "gspf", 0.003, format_version=2)
    save_delta(store, "out_of_range_2", {name: (torch.tensor([1, 64 * 64]), torch.ones(2))}, "tkllm-tiny", FP,
               "gspf", 0.003, format_version=2)
    for account, delta in {"out_of_range": {name: (torch.tensor([1, 64 * 64]), torch.ones(2))},
                           "unknown_module": {"model.layers.9.foo": (torch.tensor([1]), torch.ones(1))},
                           "fits": {name: (torch.tensor([0, 64 * 64 - 1]), torch.ones(2))}}.items():
        save_delta(store, account, delta, "tkllm-tiny", FP, "gspf", 0.003, value_dtype="fp32")
    cache = DeltaCache(store, device, base_fingerprint=FP, shapes={name: 64 * 64})
    for account, message in [("unsorted", "must be sorted and unique"), ("out_of_range", "outside its 4096 weights"),
                             ("out_of_range_2", "outside its 4096 weights"),
                             ("unknown_module", "not a target linear of the served base")]:
        with pytest.raises(DeltaLoadError, match=f"account '{account}': .*{message}"):
            cache.get(account)
    assert cache.get("fits").delta[name][0].tolist() == [0, 4095]
    cache.close()


def _adapters(rank: int = 2, din: int = 64, dout: int = 64):
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.up_proj"
    tensors = {f"{name}.lora_A": torch.randn(rank, din, generator=g), f"{name}.lora_B": torch.randn(dout, rank, generator=g),
               f"{name}.tau": torch.tensor(0.1)}
    meta = {"method": "ts-lora", "rank": rank, "alpha": 2.0 * rank, "modules": [name], "bandwidth": 0.5}
    return save(tensors), meta, tensors


def test_token_selective_adapters_load_like_deltas_and_bad_ones_are_refused(tmp_path):
    from tkllm_ray.sparse.delta_store import load_delta, save_adapters

    store = str(tmp_path / "deltas")
    blob, meta, tensors = _adapters()
    version = save_adapters(store, "ts", blob, meta, "tkllm-tiny", FP)
    cache = DeltaCache(store, base_fingerprint=FP, shapes={"model.layers.0.mlp.up_proj": 64 * 64})
    item = cache.get("ts")
    assert item.version == version and item.delta == {} and item.adapters.kind == "ts-lora"
    assert item.adapters.scale == 2.0 and torch.equal(item.adapters.modules["model.layers.0.mlp.up_proj"]["lora_B"],
                                                      tensors["model.layers.0.mlp.up_proj.lora_B"])
    assert item.nbytes == sum(t.numel() * 4 for t in tensors.values())
    with pytest.raises(TkllmError, match="holds ts-lora adapters, not a sparse delta"):
        load_delta(store, "ts")
    blob, meta, _ = _adapters(din=32)  # sizes that do not fit the served base's module
    save_adapters(store, "wrong", blob, meta, "tkllm-tiny", FP)
    with pytest.raises(DeltaLoadError, match=r"do not fit its 4096 weights"):
        cache.get("wrong")
    save_adapters(store, "other-base", _adapters()[0], meta | {"rank": 2}, "tkllm-tiny", "sha256:" + "cd" * 32)
    with pytest.raises(DeltaLoadError, match="was trained on base"):
        cache.get("other-base")
    assert cache.get("ts") is item  # the others' errors did not touch it


def test_format_2_is_flat_and_format_1_files_still_load(tmp_path):
    """Format 2 stores all modules in two tensors (the cache takes them as its flat buffers, no
    concatenation); a format-1 file (two tensors per module) still decodes to the same delta."""
    from safetensors.torch import save

    from tkllm_ray.sparse.delta_store import FlatDelta, decode, encode

    g = torch.Generator().manual_seed(3)
    delta = {name: (torch.sort(torch.randperm(4096, generator=g)[:k]).values, torch.randn(k, generator=g))
             for name, k in (("b.proj", 7), ("a.proj", 0), ("c.proj", 300))}
    new = decode(encode(delta, "fp32"))
    old = decode(save({f"{n}.{part}": t.to(torch.int32) if part == "indices" else t
                       for n, (i, v) in delta.items() for part, t in (("indices", i), ("values", v))}))
    assert isinstance(new, FlatDelta) and not isinstance(old, FlatDelta)
    assert list(new) == list(old) == ["a.proj", "b.proj", "c.proj"] and new.layout == [("a.proj", 0), ("b.proj", 7),
                                                                                         ("c.proj", 300)]
    for name, (idx, vals) in delta.items():
        for got in (new, old):
            assert torch.equal(got[name][0], idx) and torch.equal(got[name][1], vals)
    assert new["c.proj"][0].data_ptr() == new.flat[0].data_ptr() + 7 * 8  # a view into the flat indices
    from tkllm_ray.serve.delta_cache import CachedDelta

    cached = CachedDelta.of("x", "v", decode(encode(delta, "fp32"), None), {}, torch.float32)
    assert cached.flat[0].numel() == 307 and cached.delta["c.proj"][1].data_ptr() == cached.flat[1].data_ptr() + 7 * 4


def test_a_delta_read_into_a_buffer_decodes_as_views_of_it_and_a_malformed_header_is_refused():
    """What the serving cache reads (`read_hashed`: a bytearray) decodes to tensors that are views
    of the checked bytes, equal to safetensors' own decoding; offsets that do not fit are refused."""
    import json

    from tkllm_ray.sparse.delta_store import decode, encode

    g = torch.Generator().manual_seed(4)
    delta = {name: (torch.sort(torch.randperm(4096, generator=g)[:k]).values, torch.randn(k, generator=g))
             for name, k in (("b.proj", 7), ("a.proj", 0), ("c.proj", 300))}
    blob = encode(delta, "bf16")
    buf = bytearray(blob)
    got, want = decode(buf, None), decode(blob, None)
    assert got.layout == want.layout
    for a, b in zip(got.flat, want.flat):
        assert a.dtype == b.dtype and torch.equal(a, b)
    start = torch.frombuffer(buf, dtype=torch.uint8).data_ptr()
    enc = decode(buf, None, expand=False)  # as the serving cache reads it: gaps and values are views, no copy
    for t in (enc.gaps, enc.values):
        assert start <= t.data_ptr() < start + len(buf)
    assert enc.gaps.dtype == torch.int16
    # expanded on the CPU, nothing keeps the file's buffer alive: the values are their own copy
    assert not start <= got.flat[1].data_ptr() < start + len(buf)
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["values"]["data_offsets"][1] += 2  # one value more than its bytes hold
    text = json.dumps(header).encode()
    bad = bytearray(len(text).to_bytes(8, "little") + text + blob[8 + n:])
    with pytest.raises(ValueError, match="tensor 'values': its bytes"):
        decode(bad, None)
    with pytest.raises(ValueError, match="malformed safetensors header"):
        decode(bytearray((5).to_bytes(8, "little") + b"[1,2]" + blob[8 + n:]), None)


def test_prefetch_fills_the_host_tier_newest_first_until_full_and_a_device_miss_then_copies_from_it(tmp_path,
                                                                                                  monkeypatch):
    import importlib

    pub = importlib.import_module("tkllm_ray.storage.publish")  # the module (the package exports its function)

    versions = iter(f"20261124T1200{i:02d}Z-000000" for i in range(10))  # publish order = version order
    monkeypatch.setattr(pub, "new_version_id", lambda: next(versions))
    store = tmp_path / "deltas"
    for a, seed in (("old", 1), ("mid", 2), ("new", 3), ("broken", 4)):
        v = _publish(str(store), a, seed)
    (store / "broken" / v / "delta.safetensors").write_bytes(b"not a delta")  # the newest: fails, skipped
    (store / "not an id").mkdir()
    cache = DeltaCache(str(store), base_fingerprint=FP, host_budget=2 * _bytes())
    assert cache.prefetch().result(timeout=30) == ["new", "mid"]  # "old" would not fit
    assert list(cache.host.items) == ["new", "mid"] and not cache.hot.items
    # kept as two flat buffers: no per-module views (objects every full garbage collection walks)
    assert all(item._modules is None for item in cache.host.items.values())
    assert cache.stats["prefetch_errors"] == 1 and cache.stats["prefetched"] == 2 and cache.stats["store_loads"] == 0
    got = cache.get("mid").delta["model.layers.0.mlp.up_proj"]  # a device miss: from host memory
    assert cache.stats["host_hits"] == 1 and cache.stats["store_loads"] == 0
    want = _delta(2)["model.layers.0.mlp.up_proj"]
    assert got[0].dtype == torch.int32 and torch.equal(got[0].long(), want[0]) and torch.equal(got[1], want[1])
    cache.close()

    roomy = DeltaCache(str(store), base_fingerprint=FP)
    roomy.get("old")
    assert roomy.prefetch(["old", "mid", "nobody", "../x"]).result(timeout=30) == ["mid"]  # held ones skipped
    assert roomy.stats["store_loads"] == 1 and roomy.stats["prefetch_errors"] == 1  # "nobody": not published
    roomy.close()


def test_an_unpublished_account_is_dropped_at_the_next_refresh_and_an_unload_frees_its_tiers(tmp_path):
    import os

    store = str(tmp_path / "deltas")
    for a in ("a1", "a2"):
        _publish(store, a, seed=int(a[1]))
    cache = DeltaCache(store, base_fingerprint=FP)
    cache.get("a1"), cache.get("a2")
    os.remove(tmp_path / "deltas" / "a1" / "LATEST")  # unpublished (its versions stay until gc)
    assert cache.refresh() == [] and cache.stats["unpublished"] == 1
    assert "a1" not in cache.hot.items and "a1" not in cache.host.items
    with pytest.raises(UnknownAccount, match="unknown account 'a1'"):
        cache.get("a1")
    assert cache.drop("a2") and not cache.drop("a2") and not cache.hot.items and not cache.host.items
    assert cache.get("a2").account == "a2" and cache.stats["store_loads"] == 3  # loaded again from the store
    with pytest.raises(TkllmError, match="invalid account id"):
        cache.drop("../a2")
    cache.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetched_deltas_sit_pinned_in_host_memory_and_a_device_miss_copies_them(tmp_path):
    store = str(tmp_path / "deltas")
    for a in ("a1", "a2"):
        _publish(store, a, seed=int(a[1]))
    cache = DeltaCache(store, "cuda", device_budget=_bytes(), base_fingerprint=FP)  # one delta on the device
    assert sorted(cache.prefetch().result(timeout=60)) == ["a1", "a2"]
    assert all(t.is_pinned() for item in cache.host.items.values() for t in item.flat)
    for a in ("a1", "a2", "a1"):  # each a device miss, from host memory
        i, v = cache.get(a).delta["model.layers.0.mlp.up_proj"]
        want = _delta(int(a[1]))["model.layers.0.mlp.up_proj"]
        assert i.is_cuda and torch.equal(i.long().cpu(), want[0]) and torch.equal(v.cpu(), want[1])
    assert cache.stats["host_hits"] == 3 and cache.stats["store_loads"] == 0
    cache.close()
