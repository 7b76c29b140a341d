"""Delta format 3: indices as 16-bit gaps with a table of the larger ones; round trips exactly,
on the CPU and expanded on a GPU, at 4 bytes an entry with bf16 values."""

import json

import pytest
import torch

from tkllm_ray.sparse.delta_store import EncodedDelta, decode, encode, expand_indices

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


def _delta(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "m.dense": (torch.sort(torch.randperm(1 << 20, generator=g)[:3000]).values, torch.randn(3000, generator=g)),
        # gaps at and around 2^16 and far past it, and a first index past 2^16
        "m.far": (torch.tensor([70000, 70001, 70000 + 65535, 70000 + 65536 + 65535, 70000 + 2 * 65536 + 65535 + 2**30]),
                  torch.randn(5, generator=g)),
        "m.empty": (torch.empty(0, dtype=torch.int64), torch.empty(0)),
        "m.zero": (torch.tensor([0]), torch.randn(1, generator=g)),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_gaps_round_trip_exactly_on_the_cpu_and_where_they_are_expanded(device):
    delta = _delta()
    blob = encode(delta, "fp32")
    got = decode(blob)
    assert got.layout == [(n, delta[n][0].numel()) for n in sorted(delta)]
    for name, (idx, vals) in delta.items():
        assert got[name][0].dtype == torch.int64 and torch.equal(got[name][0], idx)
        assert torch.equal(got[name][1], vals)
    enc = decode(bytearray(blob), None, expand=False)
    assert isinstance(enc, EncodedDelta) and enc.index_dtype == torch.int32  # every index < 2^31
    assert enc.jumps[:, 0].tolist() == [3000, 3003, 3004]  # the far module: its first gap, one of 2^16, one past 2^30
    on = enc.expand(device, torch.bfloat16)
    assert on.flat[0].device.type == device and on.flat[0].dtype == torch.int32
    assert on.flat[1].dtype == torch.bfloat16
    for name, (idx, _) in delta.items():
        assert torch.equal(on[name][0].cpu().long(), idx)


def test_indices_past_2_31_stay_int64():
    delta = {"huge": (torch.tensor([5, 2**31 + 7, 3 * 2**31]), torch.ones(3))}
    enc = decode(encode(delta), None, expand=False)
    assert enc.index_dtype == torch.int64
    assert decode(encode(delta), None)["huge"][0].tolist() == [5, 2**31 + 7, 3 * 2**31]


def test_a_bf16_delta_takes_four_bytes_an_entry():
    delta = {"m": (torch.sort(torch.randperm(4_000_000)[:12_000]).values, torch.randn(12_000))}  # ~0.3%
    blob = encode(delta, "bf16")
    n = int.from_bytes(blob[:8], "little")
    assert len(blob) - 8 - n < 4 * 12_000 + 64  # int32 indices took 6 bytes an entry


@pytest.mark.parametrize("idx", [[3, 3, 9], [9, 3]])
def test_unsorted_or_repeated_indices_are_refused_by_the_writer(idx):
    with pytest.raises(ValueError, match="must be sorted and unique within each module"):
        encode({"m": (torch.tensor(idx), torch.ones(len(idx)))})


def test_a_gap_table_pointing_outside_the_entries_is_refused():
    blob = encode({"m": (torch.tensor([1, 200_000]), torch.ones(2))}, "fp32")
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    body = bytearray(blob[8 + n:])
    b, _ = header["jumps"]["data_offsets"]
    body[b:b + 8] = (7).to_bytes(8, "little")  # the escape's position: past the 2 entries
    text = json.dumps(header).encode()
    with pytest.raises(ValueError, match="gap table points outside its entries"):
        decode(bytes(len(text).to_bytes(8, "little") + text + body))
    for layout in ([["m", 3]], [["m", 3], ["n", -1]]):  # more entries than stored; counts that sum but go negative
        header["__metadata__"]["layout"] = json.dumps(layout)
        text = json.dumps(header).encode()
        with pytest.raises(ValueError, match="layout does not match its tensors"):
            decode(bytes(len(text).to_bytes(8, "little") + text + blob[8 + n:]))


def test_expansion_restarts_at_each_module():
    gaps = torch.tensor([1, 2, 3, 4, 1], dtype=torch.int16)
    counts = torch.tensor([2, 0, 3])
    assert expand_indices(gaps, torch.empty(0, 2, dtype=torch.int64), counts, torch.int64).tolist() == [0, 2, 2, 6, 7]


def test_the_previous_format_is_still_written_on_request_and_read_the_same():
    delta = _delta(1)
    for version in (2, 3):
        got = decode(encode(delta, "fp32", format_version=version))
        assert all(torch.equal(got[n][0], i) and torch.equal(got[n][1], v) for n, (i, v) in delta.items())
    with pytest.raises(ValueError, match="writes delta formats 2 and 3, not 4"):
        encode(delta, format_version=4)


def test_a_flat_delta_makes_module_views_when_asked_and_holds_none():
    import gc

    from tkllm_ray.sparse.delta_store import FlatDelta

    layout = [(f"model.layers.{i}.m{j}", 7) for i in range(24) for j in range(7)] + [("empty", 0)]
    idx, vals = torch.arange(7 * 168, dtype=torch.int32), torch.randn(7 * 168)
    one = FlatDelta(idx, vals, layout)
    assert len(one) == 169 and list(one) == [n for n, _ in layout] and "empty" in one and "other" not in one
    i, v = one["model.layers.1.m2"]
    assert i.tolist() == list(range(63, 70)) and i.data_ptr() == idx[63:].data_ptr() and torch.equal(v, vals[63:70])
    assert one["empty"][0].numel() == 0 and one.get("other") is None
    assert one.entries({"model.layers.0.m0", "empty", "other"}) == 7
    with pytest.raises(TypeError):
        one["x"] = (i, v)  # read-only
    # What a full garbage collection walks: held views were ~500 tracked objects a delta
    gc.collect()
    before = len(gc.get_objects())
    many = [FlatDelta(idx, vals, layout) for _ in range(200)]
    gc.collect()
    assert len(gc.get_objects()) - before < 5 * len(many)
