"""Sensitivity, scoring and top-p% selection on the tiny model."""

import pytest
import torch

from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.sparse.model import AppliedDelta, attach, detach
from tkllm_ray.sparse.selection import layer_of, scores, select
from tkllm_ray.sparse.sensitivity import collect_sensitivity, target_linears


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 8192, (2, 16), generator=g)} for _ in range(n)]


def test_sensitivity_equals_mean_abs_dense_gradient():
    model = build_model("tkllm-tiny", seed=1)
    mods = target_linears(model)
    sens = collect_sensitivity(model, _batches(), lm_loss, mods)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
    # Reference: dense gradients step by step, |g| averaged.
    ref = {n: torch.zeros_like(m.weight) for n, m in mods.items()}
    for batch in _batches():
        model.zero_grad()
        lm_loss(model, batch).backward()
        for n, m in mods.items():
            ref[n] += m.weight.grad.abs() / 3
    for n in mods:
        torch.testing.assert_close(sens[n], ref[n], rtol=1e-4, atol=1e-7)


def test_global_selection_takes_exactly_top_p_and_is_deterministic():
    model = build_model("tkllm-tiny", seed=2)
    mods = target_linears(model)
    sens = collect_sensitivity(model, _batches(2), lm_loss, mods)
    weights = {n: m.weight for n, m in mods.items()}
    total = sum(w.numel() for w in weights.values())
    a = select(sens, weights, density=0.003)
    b = select(sens, weights, density=0.003)
    assert a.k == round(0.003 * total)
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in mods)
    sc = scores(sens, weights, "global")
    picked = torch.cat([sc[n].flatten()[a.indices[n]] for n in mods])
    rest_max = max(sc[n].flatten().clone().index_fill_(0, a.indices[n], float("-inf")).max() for n in mods)
    assert picked.min() >= rest_max  # nothing unselected scores higher than a selected entry
    per = select(sens, weights, density=0.01, scope="per_module")
    assert all(per.indices[n].numel() == max(1, round(0.01 * weights[n].numel())) for n in mods)


def test_apply_and_restore_is_bit_exact_and_matches_module_path():
    model = build_model("tkllm-tiny", seed=3)
    before = fingerprint(model)
    mods = target_linears(model)
    g = torch.Generator().manual_seed(0)
    delta = {}
    for n, m in list(mods.items())[:5]:
        idx = torch.sort(torch.randperm(m.weight.numel(), generator=g)[:30]).values
        delta[n] = (idx, torch.randn(30, generator=g) * 0.1)
    ids = _batches(1)[0]["input_ids"]
    applied = AppliedDelta(model, delta)
    merged_logits = model(input_ids=ids).logits
    applied.restore()
    assert fingerprint(model) == before
    attach(model, {n: i for n, (i, _) in delta.items()}, {n: v for n, (_, v) in delta.items()})
    module_logits = model(input_ids=ids).logits
    torch.testing.assert_close(module_logits, merged_logits, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".values") for n in trainable)
    back = detach(model)
    assert fingerprint(model) == before and set(back) == set(delta)


def test_top_layers_keeps_the_budget_and_stops_backprop_below():
    model = build_model("tkllm-tiny", seed=4)
    mods = target_linears(model)
    sens = collect_sensitivity(model, _batches(2), lm_loss, mods)
    weights = {n: m.weight for n, m in mods.items()}
    full = select(sens, weights, density=0.01)
    one = select(sens, weights, density=0.01, top_layers=1)
    assert one.k == full.k  # same budget, confined
    layers = {layer_of(n) for n, i in one.indices.items() if i.numel()} - {None}
    assert len(layers) == 1
    # The favoured layer is the one the unrestricted selection gave the most entries.
    per_layer = {}
    for n, i in full.indices.items():
        if layer_of(n) is not None:
            per_layer[layer_of(n)] = per_layer.get(layer_of(n), 0) + i.numel()
    assert layers == {max(per_layer, key=lambda k: (per_layer[k], k))}
    # Nothing below the lowest selected layer takes part in the backward pass.
    low = min(layers)
    attach(model, one.indices)
    seen = {}
    hooks = [model.model.layers[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out))
             for i in range(len(model.model.layers))]
    lm_loss(model, _batches(1, seed=9)[0]).backward()
    for h in hooks:
        h.remove()
    assert all(not seen[i].requires_grad for i in range(low))
    assert seen[low].requires_grad


def test_layer_of_reads_decoder_layer_numbers():
    assert layer_of("model.layers.12.mlp.up_proj") == 12
    assert layer_of("lm_head") is None


def test_a_head_tied_to_the_embedding_is_not_a_target():
    from transformers import LlamaForCausalLM

    from tkllm_ray.models.presets import preset_config

    cfg = preset_config("tkllm-tiny")
    cfg.tie_word_embeddings = True
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert "lm_head" not in target_linears(model) and "lm_head" in target_linears(build_model("tkllm-tiny"))


def test_radix_select_finds_the_kth_largest_score_over_modules():
    from tkllm_ray.sparse.selection import _kth_largest_key, _order_key

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        sc = {f"m{i}": torch.randn(int(torch.randint(1, 800, (1,), generator=g)), generator=g) *
              10.0 ** int(torch.randint(-3, 3, (1,), generator=g)) for i in range(4)}
        sc["m0"][:40] = 0.5  # ties
        sc["m1"][:30] = 0.0 if trial % 2 else -0.0  # both zeros, and negatives elsewhere
        flat = torch.cat(list(sc.values()))
        for k in (1, int(torch.randint(1, flat.numel() + 1, (1,), generator=g)), flat.numel()):
            kth = torch.sort(flat, descending=True).values[k - 1].reshape(1)
            assert _kth_largest_key(sc, k) == int(_order_key(kth)[0]), (trial, k)


def test_sampled_bracket_and_radix_fallback_agree_with_a_sort(monkeypatch):
    from tkllm_ray.sparse import selection

    g = torch.Generator().manual_seed(1)
    sc = {"a": torch.randn(300, 200, generator=g), "b": torch.randn(5000, generator=g) * 1e-3,
          "c": torch.zeros(700)}  # a block of ties at zero
    flat = torch.cat([s.flatten() for s in sc.values()])
    monkeypatch.setattr(selection, "SAMPLE", 4096)  # sample a fraction, as on a real model
    for k in (1, 37, 2000, 60000, flat.numel() - 350, flat.numel()):
        kth = torch.sort(flat, descending=True).values[k - 1].reshape(1)
        want = int(selection._order_key(kth)[0])
        assert selection._kth_largest_key(sc, k) == want == selection._radix_kth(sc, k), k


def test_top_k_keeps_exactly_k_with_ties_filled_in_module_order(monkeypatch):
    from tkllm_ray.sparse import selection

    monkeypatch.setattr(selection, "SAMPLE", 512)  # the sampled bracket, as on a real model
    g = torch.Generator().manual_seed(2)
    sc = {"a": torch.randn(40, 50, generator=g), "b": torch.randn(3000, generator=g), "c": torch.randn(900, generator=g)}
    sc["a"].view(-1)[:30] = 1.25  # positive ties (the float-comparison path) in two modules
    sc["c"][:50] = 1.25
    sc["b"][:40] = -0.5  # negative ties (the order-key path)
    flat = torch.cat([s.flatten() for s in sc.values()])
    order = torch.sort(flat, descending=True, stable=True).indices  # ties: earlier module, earlier entry first
    starts = {"a": 0, "b": 2000, "c": 5000}
    for k in (1, 100, int((flat > 1.25).sum()) + 45, int((flat >= -0.5).sum()) - 7, flat.numel()):
        got = selection.top_k(sc, k)
        want = torch.sort(order[:k]).values
        assert sum(i.numel() for i in got.values()) == k
        assert torch.equal(torch.cat([got[n] + starts[n] for n in sc]), want), k
        assert all(i.dtype == torch.int64 and torch.equal(i, torch.sort(i).values) for i in got.values())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scores_with_nan_or_inf_are_refused_with_a_clear_error(bad, monkeypatch):
    from tkllm_ray.sparse import selection

    sc = {"a": torch.randn(100), "b": torch.randn(50)}
    sc["b"][3] = bad
    for sample in (selection.SAMPLE, 16):  # every score read, and the sampled bracket's counting pass
        monkeypatch.setattr(selection, "SAMPLE", sample)
        with pytest.raises(ValueError, match="NaN or infinite"):
            selection.top_k(sc, 10)
    with pytest.raises(ValueError, match="NaN or infinite"):
        selection.select(sc, None, density=0.1, scope="per_module")
