"""A published delta merged into a standalone Hugging Face directory gives the trained model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tkllm_ray.errors import TkllmError
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.sparse.delta_store import save_delta
from tkllm_ray.sparse.merge import merge_delta
from tkllm_ray.sparse.model import AppliedDelta


def _publish(store, options=None, seed=3):
    base = build_model("tkllm-tiny", seed=seed)
    g = torch.Generator().manual_seed(0)
    delta = {}
    for name in ("model.layers.3.self_attn.o_proj", "lm_head"):
        w = base.get_submodule(name).weight
        idx = torch.sort(torch.randperm(w.numel(), generator=g)[:50]).values
        delta[name] = (idx, torch.randn(50, generator=g) * 0.05)
    save_delta(store, "acct1", delta, "tkllm-tiny", fingerprint(base), "gspf", 0.003, value_dtype="fp32", options=options)
    return base, delta


@pytest.mark.parametrize("where", ["local", "s3"])
def test_merged_directory_reproduces_base_plus_delta(where, tmp_path, request):
    if where == "s3":
        server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        store, out, opts = f"s3://{bucket}/deltas", f"s3://{bucket}/merged/acct1", server.options()
    else:
        store, out, opts = str(tmp_path / "deltas"), str(tmp_path / "merged"), None
    base, delta = _publish(store, opts)
    info = merge_delta(store, "acct1", out, seed=3, options=opts)
    assert info["entries"] == 100 and info["base_fingerprint"] == fingerprint(base)
    if where == "s3":
        from tkllm_ray.storage.cache import local_dir

        out = local_dir(out, options=opts)
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert len(AutoTokenizer.from_pretrained(out)) == 8192
    AppliedDelta(base, delta)  # the in-place apply is the reference
    ids = torch.randint(2, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, rtol=0, atol=0)
    assert fingerprint(merged) == info["merged_fingerprint"] != info["base_fingerprint"]


def test_merge_refuses_another_base_and_an_existing_output(tmp_path):
    store = str(tmp_path / "deltas")
    _publish(store)
    with pytest.raises(TkllmError, match="not the base delta acct1 was trained on"):
        merge_delta(store, "acct1", str(tmp_path / "m1"), seed=4)
    (tmp_path / "m2").mkdir()
    with pytest.raises(TkllmError, match="already exists"):
        merge_delta(store, "acct1", str(tmp_path / "m2"), seed=3)


def test_merge_command(tmp_path, capsys):
    from tkllm_ray.cli.main import main

    store, out = str(tmp_path / "deltas"), str(tmp_path / "merged")
    _publish(store)
    assert main(["merge", "--deltas", store, "--account", "acct1", "--output", out, "--seed", "3"]) == 0
    assert "merged 100 entries of acct1" in capsys.readouterr().out
    assert (tmp_path / "merged" / "config.json").exists() and (tmp_path / "merged" / "tkllm_merge.json").exists()
    assert main(["merge", "--deltas", store, "--account", "nobody", "--output", out]) == 1
    assert "no delta published for account 'nobody'" in capsys.readouterr().err


MERGE_CHECK = r"""
import torch
from tkllm_ray.sparse.delta_store import FlatDelta
from tkllm_ray.sparse.merge_triton import MergedDelta, mergeable
from tkllm_ray.sparse.model import AppliedDelta, _flat
dev = "{device}"
g = torch.Generator().manual_seed(0)
# (bf16 on a GPU only: the interpreter rounds fp32 to bf16 by truncation; fp16 rounds as on a GPU)
for dt in [torch.float32, torch.float16] + ([torch.bfloat16] if dev == "cuda" else []):
    # three weights, two of them views of one stacked tensor (as the engine's q/k/v stacks are)
    stack = torch.randn(40, 16, generator=g).to(dev, dt)
    weights = [stack[:24], stack[24:], torch.randn(8, 30, generator=g).to(dev, dt)]
    assert mergeable(weights)
    assert not mergeable([weights[0], stack]) and not mergeable([stack, weights[1]])  # overlapping: refused
    delta = {{}}
    for name, w in zip("abc", weights):
        k = w.numel() // 3
        idx = torch.sort(torch.randperm(w.numel(), generator=g)[:k]).values.to(dev)
        delta[name] = (idx, (torch.randn(k, generator=g) * 0.3).to(dev))  # fp32 values on a 16-bit base: rounded once
    before = [w.clone() for w in weights]
    want = [w.clone() for w in weights]
    for w, (idx, v) in zip(want, delta.values()):  # the torch path's rule: base + v in fp32, rounded once
        w.view(-1)[idx] = (w.view(-1)[idx].float() + v.float()).to(dt)
    flat = FlatDelta(*_flat(delta)[:2], [(n, i.numel()) for n, (i, _) in delta.items()])
    for d in (delta, flat):  # a dict's modules concatenated, a FlatDelta's buffers as they are
        m = MergedDelta(weights, *_flat(d))
        assert all(torch.equal(w, x) for w, x in zip(weights, want))
        m.restore()
        assert all(torch.equal(w, b) for w, b in zip(weights, before))  # bit-exact
print("ok")
"""


def test_a_whole_delta_merges_in_one_launch_as_module_by_module_and_restores_bit_exact(kernel_check):
    kernel_check(MERGE_CHECK)


def test_applied_delta_restores_the_base_bit_exact_on_the_torch_path():
    base = build_model("tkllm-tiny", seed=3)
    base.lm_head.weight = base.model.embed_tokens.weight  # tied: two modules' entries on one tensor
    before = {n: p.clone() for n, p in base.named_parameters()}
    g = torch.Generator().manual_seed(1)
    numel = base.lm_head.weight.numel()
    shared = torch.sort(torch.randperm(numel, generator=g)[:40]).values  # the same elements in both modules
    delta = {"model.embed_tokens": (shared, torch.randn(40, generator=g)), "lm_head": (shared, torch.randn(40, generator=g)),
             "model.layers.0.mlp.up_proj": (torch.sort(torch.randperm(1000, generator=g)[:40]).values,
                                            torch.randn(40, generator=g))}
    applied = AppliedDelta(base, delta)
    w = base.lm_head.weight.view(-1)
    first = before["model.embed_tokens.weight"].view(-1)[shared] + delta["model.embed_tokens"][1]
    assert torch.equal(w[shared], first + delta["lm_head"][1])  # applied one after the other
    applied.restore()
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())  # bit-exact, the shared ones too
