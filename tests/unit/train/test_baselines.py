"""The Adapter and DiffPruning baselines on the tiny preset: identity at start, what trains, export."""

import pytest
import torch

from tkllm_ray.errors import TkllmError
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.sparse.delta_store import decode, encode, load_delta, save_delta
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.selection import budget
from tkllm_ray.train.baselines import Adapter, DenseTrainer, load_adapter
from tkllm_ray.train.diffpruning import DiffPruning, DiffPruningSettings, hard_concrete, open_probability
from tkllm_ray.train.single import lm_loss, perplexity

VOCAB = 256


def _base():
    return build_model("tkllm-tiny", vocab_size=VOCAB, seed=0)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 10, (4, 32), generator=g)  # 8 distinct tokens: something to learn in a few steps
    return ids, ids.clone()


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits


def _train(trainer, batch, steps=8):
    losses = [trainer.step(batch) for _ in range(steps)]
    assert losses[-1] < losses[0] - 0.1, losses  # a short run on one batch lowers the train loss
    return losses


def test_adapter_starts_as_the_base_and_only_adapters_get_gradients(batch):
    model = _base()
    before = _logits(model, batch[0])
    adapter = Adapter(model, bottleneck=8)
    assert len(adapter.modules) == 8 and all(n.endswith(("self_attn.o_proj", "mlp.down_proj")) for n in adapter.modules)
    assert torch.equal(_logits(model, batch[0]), before)
    trainer = DenseTrainer(model, lm_loss, lr=1e-2)
    trainer.step(batch)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if ".adapter." in n}
    assert sum(p.numel() for g in trainer.opt.param_groups for p in g["params"]) == 8 * (64 * 8 + 8 + 8 * 64 + 64)


def test_adapter_save_load_reproduces_the_trained_logits(batch, tmp_path):
    model = _base()
    base_fp = fingerprint(model)
    adapter = Adapter(model, bottleneck=8)
    _train(DenseTrainer(model, lm_loss, lr=1e-2), batch)
    trained = _logits(model, batch[0])
    uri = adapter.save(str(tmp_path / "adapter"), "tkllm-tiny", base_fp)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter.safetensors", "adapter_config.json"}
    fresh = _base()
    loaded = load_adapter(uri, fresh, base_fingerprint=fingerprint(fresh))
    assert torch.equal(_logits(fresh, batch[0]), trained)
    assert fingerprint(loaded.remove()) == base_fp  # taking it out leaves the very same base
    with pytest.raises(TkllmError, match="trained on base tkllm-tiny"):
        load_adapter(uri, build_model("tkllm-tiny", vocab_size=VOCAB, seed=1), base_fingerprint="sha256:other")


def test_hard_concrete_gates_and_their_open_probability():
    log_alpha = torch.linspace(-6, 6, 13).repeat(20000, 1)
    z = hard_concrete(log_alpha, sample=True)
    assert z.min() >= 0 and z.max() <= 1 and (z == 0).any() and (z == 1).any()  # stretched and clamped
    p = open_probability(log_alpha[0])
    assert ((p >= 0) & (p <= 1)).all()
    assert torch.allclose((z != 0).float().mean(0), p, atol=0.015)  # P(z != 0) matches the samples
    det = hard_concrete(log_alpha[0], sample=False)
    assert det[0] == 0 and det[-1] == 1 and torch.equal(det, hard_concrete(log_alpha[0], sample=False))


def test_diffpruning_starts_as_the_base_and_a_large_l0_closes_gates(batch):
    model = _base()
    before = _logits(model, batch[0])
    dp = DiffPruning(model, lm_loss, DiffPruningSettings(l0=100.0, alpha_init=0.0, lr=0.3))
    assert torch.equal(_logits(model, batch[0]), before)  # w starts at zero
    l0 = [dp.l0().item()]
    for _ in range(3):
        dp.step(batch)
        l0.append(dp.l0().item())
    assert l0 == sorted(l0, reverse=True) and l0[-1] < l0[0] - 0.05


def test_diffpruning_exports_gspf_budget_that_reproduces_the_eval(batch, tmp_path):
    model = _base()
    base_fp = fingerprint(model)
    dp = DiffPruning(model, lm_loss, DiffPruningSettings(density=0.01, lr=1e-2))
    _train(dp, batch)
    delta = dp.export()
    n = sum(m.weight.numel() for m in dp.model.modules() if isinstance(m, torch.nn.Linear))
    assert dp.entries == n and sum(i.numel() for i, _ in delta.values()) == budget(0.01, n) == round(0.01 * n)
    assert fingerprint(dp.remove()) == base_fp
    AppliedDelta(model, decode(encode(delta)))  # what run_finetune evaluates: the projected, shipped delta
    shipped = perplexity(model, *batch, batch_size=2)
    save_delta(str(tmp_path), "acc", delta, "tkllm-tiny", base_fp, "diffpruning", 0.01)
    fresh = _base()
    loaded, manifest = load_delta(str(tmp_path), "acc", base_fingerprint=fingerprint(fresh))
    AppliedDelta(fresh, loaded)
    assert manifest["method"] == "diffpruning" and perplexity(fresh, *batch, batch_size=2) == shipped
    assert shipped < perplexity(_base(), *batch, batch_size=2)  # the projection keeps what was learned


def test_adapter_needs_a_llama_style_decoder():
    with pytest.raises(TkllmError, match="Llama-style decoder"):
        Adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)))
