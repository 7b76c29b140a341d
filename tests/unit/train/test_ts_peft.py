"""Token-selective adapters: the gate is the formula, τ moves the way the objective asks, τ = 0 is
plain LoRA, the activation rate reaches its target, the inference path (which skips work) equals
the training-time forward, and adapters round-trip through their tensors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tkllm_ray.models import build_model
from tkllm_ray.sparse.sensitivity import target_linears
from tkllm_ray.train import ts_artifacts as A
from tkllm_ray.train import ts_peft as T


def _layer(kind=T.TSLoRALinear, tau=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(16, 12)
    layer = kind(base, rank=4, alpha=8.0, tau=tau)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)  # a non-zero update (B starts at zero)
    return layer


@pytest.mark.parametrize("kind", [T.TSLoRALinear, T.TSDoRALinear])
def test_the_gate_is_the_reference_formula(kind):
    layer = _layer(kind, tau=0.0)
    x = torch.randn(3, 7, 16)
    m = layer.update(x, layer.base(x)).detach()
    r = m.norm(dim=-1) / layer.base(x).norm(dim=-1)
    with torch.no_grad():
        layer.tau.fill_(float(r.median()))
    want = layer.base(x) + (r >= layer.tau).float().unsqueeze(-1) * m
    got = layer(x)
    torch.testing.assert_close(got, want)
    assert 0 < float(layer.last_rate.detach()) < 1  # the median threshold splits the tokens
    if kind is T.TSDoRALinear:  # DoRA's update: m ⊙ (W0 + sBA)x / ‖W0 + sBA‖_row − W0 x
        d = layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A
        dora = (layer.magnitude / d.norm(dim=1)) * (x @ d.T) + layer.base.bias
        torch.testing.assert_close(m, (dora - layer.base(x)).detach(), rtol=1e-5, atol=1e-5)


def test_with_tau_zero_ts_lora_is_plain_lora_exactly():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12))
    ref = get_peft_model(copy.deepcopy(net), LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0))
    ours = T.attach(net, "ts-lora", {"0": net[0]}, rank=4, alpha=8.0)["0"]
    lora = ref.base_model.model[0]
    with torch.no_grad():
        ours.lora_A.copy_(lora.lora_A["default"].weight)
        ours.lora_B.normal_(0, 0.3)
        lora.lora_B["default"].weight.copy_(ours.lora_B)
    x = torch.randn(5, 16)
    y_ref, y = ref(x), net(x)
    assert torch.equal(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert torch.equal(ours.lora_A.grad, lora.lora_A["default"].weight.grad)
    assert torch.equal(ours.lora_B.grad, lora.lora_B["default"].weight.grad)


def _tau_grad(layer, x, target):
    layer.tau.grad = None
    F.mse_loss(layer(x), target, reduction="sum").backward()
    return float(layer.tau.grad)


def test_tau_moves_the_way_the_objective_demands():
    layer, x = _layer(), torch.randn(64, 16)
    y0 = layer.base(x).detach()
    m = layer.update(x, y0).detach()
    r = m.norm(dim=-1) / y0.norm(dim=-1)
    with torch.no_grad():
        layer.tau.fill_(float(r.median()))
    # the update only hurts (the target is the base output): descent must raise τ (fewer updates)
    assert _tau_grad(layer, x, y0) < 0
    # the update is exactly what the target needs: descent must lower τ (more tokens updated)
    assert _tau_grad(layer, x, y0 + m) > 0
    # the penalty alone: a rate above the target raises τ, below it lowers τ
    for rate, sign in ((0.1, -1), (0.9, 1)):
        layer.tau.grad = None
        layer(x)
        T.penalty({"l": layer}, rate, 1.0).backward()
        assert sign * float(layer.tau.grad) > 0


def test_the_activation_rate_reaches_its_target_on_the_tiny_model():
    torch.manual_seed(0)
    model = build_model("tkllm-tiny", vocab_size=128, seed=0)
    mods = T.attach(model, "ts-lora", target_linears(model), rank=4)
    opt = torch.optim.AdamW(T.adapter_params(mods), lr=1e-2)
    taus = T.TauOptimizer(mods, lr=5e-2)
    ids = torch.randint(2, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss + T.penalty(mods, 0.5, 5.0)
        opt.zero_grad()
        taus.zero_grad()
        loss.backward()
        opt.step()
        taus.step()
    for m in mods.values():
        m.counts.update(tokens=0, active=0)
    with torch.no_grad():
        model.train()
        model(input_ids=ids)
    rate = sum(m.counts["active"] for m in mods.values()) / sum(m.counts["tokens"] for m in mods.values())
    assert abs(rate - 0.5) < 0.1, rate
    assert all(float(m.tau) >= 0 for m in mods.values())


@pytest.mark.parametrize("method", ["ts-lora", "ts-dora"])
def test_inference_skips_work_and_equals_the_training_forward_and_adapters_round_trip(method, tmp_path):
    torch.manual_seed(0)
    model = build_model("tkllm-tiny", vocab_size=128, seed=0)
    fresh = copy.deepcopy(model)
    mods = T.attach(model, method, target_linears(model), rank=4)
    ids = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    model.train()
    with torch.no_grad():  # training-time gate (grad mode off only to compare values)
        for m in mods.values():
            m.lora_B.normal_(0, 0.05)
        model(input_ids=ids)  # each layer's median r ...
        for m in mods.values():
            m.tau.fill_(m.r_scale)  # ... as its threshold: about half the tokens pass
        want = model(input_ids=ids).logits
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    skipped = sum(m.counts["skipped_flops"] for m in mods.values())
    assert (skipped > 0) == (method == "ts-lora")  # LoRA's gate needs no B projection; DoRA's does
    assert 0 < sum(m.counts["active"] for m in mods.values()) < sum(m.counts["tokens"] for m in mods.values())

    tensors = T.state_dict(mods)
    again = T.attach(fresh, method, target_linears(fresh), rank=4)
    T.load_state(again, tensors)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, got)
    with pytest.raises(ValueError, match="do not match the attached modules"):
        T.load_state(again, {k: v for k, v in tensors.items() if not k.endswith("tau")})
    ranked = T.ranking(mods)
    assert [r for _, r in ranked] == sorted((r for _, r in ranked), reverse=True)
    kept = T.keep_top(model, mods, 0.5)
    assert len(kept) == round(0.5 * len(mods)) and set(kept) == {n for n, _ in ranked[: len(kept)]}
    assert (tmp_path / "rates.png").name == A.plot_rates(mods, str(tmp_path / "rates.png")).rsplit("/", 1)[1]


def _shut_about_half(model, mods, ids):
    """Random B, then each layer's median r on `ids` as its threshold: some gates shut, some open."""
    model.train()
    with torch.no_grad():
        for m in mods.values():
            m.lora_B.normal_(0, 0.05)
        model(input_ids=ids)
        for m in mods.values():
            m.tau.fill_(m.r_scale)
            m.counts.update(tokens=0, active=0, skipped_flops=0)


@pytest.mark.parametrize("mask_by", ["labels", "attention_mask"])
def test_padding_is_left_out_of_the_rates(mask_by):
    torch.manual_seed(0)
    model = build_model("tkllm-tiny", vocab_size=128, seed=0)
    mods = T.attach(model, "ts-lora", target_linears(model), rank=4)
    ids = torch.randint(2, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    real = 10  # the rest is padding, as pack leaves after the last post
    _shut_about_half(model, mods, ids[:, :real])
    mask = torch.arange(16).unsqueeze(0) < real
    padded = {"labels": ids.masked_fill(~mask, -100)} if mask_by == "labels" else {"attention_mask": mask.long()}

    def counts(grad: bool, **kw):
        model.train(grad)
        with torch.set_grad_enabled(grad):
            model(**kw)
        out = {n: dict(m.counts) for n, m in mods.items()}
        rates = {n: float(m.last_rate) for n, m in mods.items()} if grad else None
        for m in mods.values():
            m.counts.update(tokens=0, active=0, skipped_flops=0)
        return out, rates

    for grad in (True, False):  # the training forward and the gated inference path
        got, got_rates = counts(grad, input_ids=ids, **padded)
        want, want_rates = counts(grad, input_ids=ids[:, :real])  # causal: the real tokens' gates are the same
        assert all(c["tokens"] == real for c in got.values())
        assert got == want
        assert got_rates == pytest.approx(want_rates)
        assert 0 < sum(c["active"] for c in got.values()) < real * len(got)
    assert all(c["tokens"] == 16 for c in counts(False, input_ids=ids)[0].values())  # no mask: every position


def test_dora_is_ts_dora_with_the_gate_held_open_and_publishes(tmp_path):
    from tkllm_ray.config.finetune import FinetuneConfig
    from tkllm_ray.train.data import pack
    from tkllm_ray.train.single import perplexity, publish_run, train_account

    torch.manual_seed(0)
    model = build_model("tkllm-tiny", vocab_size=128, seed=0)
    fresh = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(4)
    lengths = torch.randint(5, 20, (40,), generator=gen)
    posts = [torch.randint(2, 40, (int(n),), generator=gen).tolist() for n in lengths]
    cfg = FinetuneConfig(account="a", data="-", method="dora", epochs=3, lr=1e-2, seq_len=32, lora_rank=4,
                         ts_target_rate=0.3, ts_penalty=10.0, device="cpu", output=str(tmp_path / "out"))
    run = train_account(cfg, model, 1, posts[:32], posts[32:], progress=False)
    r = run.result
    assert r["eval_ppl_after"] < r["eval_ppl_before"]
    assert all(type(m) is T.TSDoRALinear and float(m.tau) == 0 and not m.tau.requires_grad
               for m in run.trainer.modules.values())
    for phase in ("train", "eval"):  # every real token takes its update, in training and at inference
        assert r["token_selective"][phase]["activation_rate"] == 1.0 and r["token_selective"][phase]["tokens"] > 0
    published = publish_run(cfg, run)
    assert published["model_uri"] == str(tmp_path / "out" / "a" / published["version"])  # a delta-store version
    from tkllm_ray.orchestrate.registry import show

    manifest = show(str(tmp_path / "out"), "a").manifest
    assert manifest["artifact"] == "ts-adapters" and manifest["method"] == "ts-dora" and manifest["trained_as"] == "dora"
    A.load_ts(fresh, published["model_uri"])
    ids, labels = pack(posts[32:], 1, 32)
    assert perplexity(fresh, ids, labels, 8) == pytest.approx(r["eval_ppl_after"], rel=1e-5)
