"""Packed token-selective fine-tunes: accounts trained side by side in mixed micro-batches end with
the adapters, thresholds, activation rates and held-out perplexities they get alone."""

import copy

import pytest
import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.models import build_model
from tkllm_ray.train import ts_peft
from tkllm_ray.train.packed import AccountJob
from tkllm_ray.train.packed_ts import PackedTS
from tkllm_ray.train.single import train_account

EOS = 0


def _jobs(method, n=3):
    g = torch.Generator().manual_seed(11)
    jobs = []
    for a in range(n):
        posts = [torch.randint(2, 400 + 300 * a, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(14 + 6 * a)]  # accounts of different sizes: different step counts
        cfg = FinetuneConfig(account=f"acct{a}", data="-", method=method, epochs=3, seq_len=32, batch_size=3,
                             lr=1e-2, lora_rank=4, ts_tau_lr=0.2, seed=a)
        jobs.append(AccountJob(cfg, posts[:-3], posts[-3:]))
    return jobs


@pytest.mark.parametrize("method", ["ts-lora", "dora"])
def test_packed_adapters_equal_solo_adapters(method):
    base = build_model("tkllm-tiny", seed=0)
    solo = {}
    for job in _jobs(method):
        run = train_account(job.cfg, copy.deepcopy(base), EOS, job.train_posts, job.eval_posts, progress=False)
        solo[job.cfg.account] = (ts_peft.state_dict(run.trainer.modules), run.result)

    model = copy.deepcopy(base)
    engine = PackedTS(model, method, max_resident=2, max_rows=6)  # churn: 3 accounts, 2 resident, mixed batches
    packed = {}
    stats = engine.run(_jobs(method), EOS, lambda acct, result, modules, trainer: packed.__setitem__(
        acct.account, (ts_peft.state_dict(modules), result)))
    assert sorted(packed) == sorted(solo) and stats["max_resident"] == 2
    assert stats["rows"] > 1.2 * 3 * stats["train_steps"]  # micro-batches mixed accounts (3 rows a batch)
    for acct, (tensors, result) in packed.items():
        ref, ref_result = solo[acct]
        assert sorted(tensors) == sorted(ref)
        for name, t in tensors.items():
            torch.testing.assert_close(t, ref[name], rtol=1e-3, atol=1e-5)
        if method == "ts-lora":
            assert any(float(t) > 0 for n, t in tensors.items() if n.endswith(".tau"))  # the thresholds moved
        else:
            assert all(float(t) == 0 for n, t in tensors.items() if n.endswith(".tau"))  # DoRA: the gate stays open
        assert result["steps"] == ref_result["steps"]
        for key in ("eval_ppl_before", "eval_ppl_after", "train_loss_last"):
            assert result[key] == pytest.approx(ref_result[key], rel=1e-4)
        for phase in ("train", "eval"):
            got, want = result["token_selective"][phase], ref_result["token_selective"][phase]
            assert got["tokens"] == want["tokens"]
            assert got["activation_rate"] == pytest.approx(want["activation_rate"], abs=2e-3)
    # The base is untouched and holds no adapter once every account is done.
    assert all(not r.adapters and not r.plan for r in engine.routers.values())
    for (_, p), (_, q) in zip(sorted(base.state_dict().items()), sorted(
            {k.replace(".base.", "."): v for k, v in model.state_dict().items()}.items())):
        assert torch.equal(p, q)


def test_packed_ts_refuses_other_methods():
    with pytest.raises(ValueError, match="packed token-selective training runs"):
        PackedTS(build_model("tkllm-tiny", seed=0), "lora")
