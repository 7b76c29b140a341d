"""Sparse training = dense training with a 0/1 gradient mask; deltas round-trip through stores."""

import pytest
import torch

from tkllm_ray.errors import TkllmError
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.sparse.delta_store import load_delta, save_delta
from tkllm_ray.sparse.model import AppliedDelta, attach
from tkllm_ray.sparse.selection import select
from tkllm_ray.sparse.sensitivity import collect_sensitivity, target_linears


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _data(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 8192, (2, 12), generator=g) for _ in range(n)]


def _selection(model):
    mods = target_linears(model)
    sens = collect_sensitivity(model, _data(9, 2), lm_loss, mods)
    return select(sens, {n: m.weight for n, m in mods.items()}, density=0.005).indices


def test_sparse_adamw_matches_dense_masked_adamw():
    torch.use_deterministic_algorithms(True)
    sparse_model, dense_model = build_model("tkllm-tiny", seed=5), build_model("tkllm-tiny", seed=5)
    sel = _selection(sparse_model)
    base = {n: p.detach().clone() for n, p in dense_model.named_parameters()}
    mods = attach(sparse_model, sel)
    opt_s = torch.optim.AdamW([m.values for m in mods.values()], lr=1e-2, weight_decay=0.0)

    masks = {}
    for n, p in dense_model.named_parameters():
        mod = n.removesuffix(".weight")
        m = torch.zeros(p.numel())
        if mod in sel and n.endswith(".weight"):
            m[sel[mod]] = 1
        masks[n] = m.view_as(p)
    opt_d = torch.optim.AdamW(dense_model.parameters(), lr=1e-2, weight_decay=0.0)
    for batch in _data():
        ls = lm_loss(sparse_model, batch)
        opt_s.zero_grad()
        ls.backward()
        opt_s.step()
        ld = lm_loss(dense_model, batch)
        opt_d.zero_grad()
        ld.backward()
        for n, p in dense_model.named_parameters():
            p.grad.mul_(masks[n])
        opt_d.step()
        torch.testing.assert_close(ls, ld, rtol=1e-5, atol=1e-6)
    # Optimizer state exists for the k selected values only.
    state = sum(t.numel() for s in opt_s.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    assert state == 2 * sum(i.numel() for i in sel.values())
    for n, p in dense_model.named_parameters():
        mod = n.removesuffix(".weight")
        if mod in mods:
            learned = base[n].flatten()[sel[mod]] + mods[mod].values.detach()
            torch.testing.assert_close(learned, p.detach().flatten()[sel[mod]], rtol=1e-5, atol=1e-6)
            untouched = masks[n].flatten() == 0
            assert torch.equal(p.detach().flatten()[untouched], base[n].flatten()[untouched])
        else:
            assert torch.equal(p.detach(), base[n])
    torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_delta_roundtrip_and_base_check(where, tmp_path, request):
    model = build_model("tkllm-tiny", seed=6)
    fp = fingerprint(model)
    sel = _selection(model)
    delta = {n: (i, torch.randn(i.numel()) * 0.01) for n, i in sel.items()}
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        store, opts = f"s3://{bucket}/deltas", server.options()
    else:
        store, opts = str(tmp_path / "deltas"), None
    v1 = save_delta(store, "ana_b", delta, "tkllm-tiny", fp, "gspf", 0.005, value_dtype="fp32", options=opts)
    v2 = save_delta(store, "ana_b", delta, "tkllm-tiny", fp, "gspf", 0.005, options=opts)
    loaded, manifest = load_delta(store, "ana_b", base_fingerprint=fp, options=opts)
    assert manifest["parent_version"] == v1 and manifest["value_dtype"] == "bf16"
    old, _ = load_delta(store, "ana_b", version=v1, options=opts)
    for n, (i, v) in delta.items():
        assert torch.equal(old[n][0], i) and torch.equal(old[n][1], v)
        assert torch.equal(loaded[n][1].float(), v.to(torch.bfloat16).float())
    other = build_model("tkllm-tiny", seed=7)
    with pytest.raises(TkllmError, match=r"delta ana_b/.* was trained on base tkllm-tiny .*not the loaded base"):
        load_delta(store, "ana_b", base_fingerprint=fingerprint(other), options=opts)
    with pytest.raises(TkllmError, match="no delta published for account 'bob'"):
        load_delta(store, "bob", options=opts)
    with pytest.raises(TkllmError, match="invalid account id"):
        load_delta(store, "../ana_b", options=opts)
    applied = AppliedDelta(model, loaded)
    applied.restore()
    assert fingerprint(model) == fp and v2 != v1


def test_corrupt_delta_is_refused(tmp_path):
    model = build_model("tkllm-tiny", seed=6)
    delta = {"model.layers.0.mlp.down_proj": (torch.tensor([1, 5, 9]), torch.tensor([0.1, 0.2, 0.3]))}
    store = str(tmp_path / "deltas")
    v = save_delta(store, "ana_b", delta, "tkllm-tiny", fingerprint(model), "gspf", 0.003)
    path = tmp_path / "deltas" / "ana_b" / v / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TkllmError, match=rf"delta ana_b/{v} is corrupt"):
        load_delta(store, "ana_b")


def test_a_half_published_version_of_a_run_is_discarded(tmp_path):
    from tkllm_ray.sparse.delta_store import discard_unpublished, published_by

    store = str(tmp_path / "deltas")
    model = build_model("tkllm-tiny", seed=6)
    delta = {"lm_head": (torch.tensor([1, 5, 9]), torch.ones(3))}
    v1 = save_delta(store, "a1", delta, "tkllm-tiny", fingerprint(model), "gspf", 0.01, run_id="r1")
    orphan = tmp_path / "deltas" / "a1" / "20990101T000000Z-orphan"
    orphan.mkdir()
    (orphan / "manifest.json").write_text('{"run_id": "r2"}')
    assert published_by(store, "a1", "r1") and not published_by(store, "a1", "r2")
    assert discard_unpublished(store, "a1", "r2") == [orphan.name]
    assert sorted(p.name for p in (tmp_path / "deltas" / "a1").iterdir()) == sorted(["LATEST", v1])
    load_delta(store, "a1")  # the published one is untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_delta_with_cpu_indices_trains_on_the_gpu():
    from tkllm_ray.sparse.gspf import GSPF, GSPFSettings

    model = build_model("tkllm-tiny", seed=6).cuda()
    g = GSPF.from_delta(model, lm_loss, {"lm_head": (torch.tensor([1, 5, 9]), torch.zeros(3))}, GSPFSettings(lr=1e-2))
    assert g.state.values["lm_head"].device.type == "cuda"
    g.step(torch.randint(2, 8192, (2, 12), device="cuda"))
    assert g.state.values["lm_head"].abs().sum() > 0
