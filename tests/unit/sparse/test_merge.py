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
