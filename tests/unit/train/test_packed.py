"""Packing must not change the math: accounts trained side by side in mixed micro-batches end with
the deltas they get when each is trained alone (same seed, same data), re-selection included."""

import copy

import pytest
import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.models import build_model
from tkllm_ray.train.packed import AccountJob, PackedGSPF
from tkllm_ray.train.single import train_account

EOS = 0


def _jobs(n=4, density=0.01):
    g = torch.Generator().manual_seed(7)
    jobs = []
    for a in range(n):
        posts = [torch.randint(2, 400 + 300 * a, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(14 + 6 * a)]  # accounts of different sizes: different step counts
        cfg = FinetuneConfig(account=f"acct{a}", data="-", method="gspf", epochs=3, reselect_every=2, density=density,
                             seq_len=32, batch_size=3, warmup_steps=2, lr=1e-2, seed=a)
        jobs.append(AccountJob(cfg, posts[:-3], posts[-3:]))
    return jobs


def test_packed_deltas_equal_solo_deltas():
    base = build_model("tkllm-tiny", seed=0)
    solo = {}
    for job in _jobs():
        run = train_account(job.cfg, copy.deepcopy(base), EOS, job.train_posts, job.eval_posts, progress=False)
        solo[job.cfg.account] = (run.delta, run.result)

    model = copy.deepcopy(base)
    engine = PackedGSPF(model, max_resident=3, max_rows=7)  # churn: 4 accounts, 3 resident, split batches
    packed, losses = {}, {}

    def done(user, delta):
        packed[user.account] = delta
        losses[user.account] = user.losses

    stats = engine.run(_jobs(), EOS, done)
    assert sorted(packed) == sorted(solo) and stats["max_resident"] == 3
    for acct, delta in packed.items():
        ref, result = solo[acct]
        assert sorted(delta) == sorted(ref)
        for name, (idx, vals) in delta.items():
            assert torch.equal(idx, ref[name][0]), (acct, name)  # the same selection, re-selection included
            # fp32 sums in another order (batched GEMMs); Adam divides by sqrt(v): tiny grads amplify it
            torch.testing.assert_close(vals, ref[name][1], rtol=1e-3, atol=1e-5)
        assert len(losses[acct]) == result["steps"]
        assert abs(losses[acct][-1] - result["train_loss_last"]) < 1e-4
        # One account owning the model: the delta as published, scattered in and restored exactly.
        job = next(j for j in _jobs() if j.cfg.account == acct)
        ppl = engine.perplexity(job.eval_posts, EOS, job.cfg, delta)
        assert abs(ppl - result["eval_ppl_after"]) / result["eval_ppl_after"] < 1e-4
    for (n, p), (_, q) in zip(sorted(base.state_dict().items()), sorted(
            {k.replace(".base.", "."): v for k, v in model.state_dict().items()}.items())):
        assert torch.equal(p, q), n  # the shared base is untouched


def test_a_crash_resumes_from_per_account_checkpoints(tmp_path):
    from tkllm_ray.train.packed import UserCheckpoints

    base = build_model("tkllm-tiny", seed=0)
    solo = {j.cfg.account: train_account(j.cfg, copy.deepcopy(base), EOS, j.train_posts, j.eval_posts,
                                         progress=False).delta for j in _jobs(3)}
    ck = UserCheckpoints(str(tmp_path / "ck"), every=2)
    done = {}

    def crash_after(n):
        def hook(engine, picked):
            if engine.stats["train_steps"] >= n:
                raise RuntimeError("worker lost")
        return hook

    first = PackedGSPF(copy.deepcopy(base), max_resident=2, max_rows=7, checkpoints=ck)
    first.on_step = crash_after(9)
    try:
        first.run(_jobs(3), EOS, lambda u, d: done.__setitem__(u.account, d))
    except RuntimeError:
        pass
    assert 0 < len(list((tmp_path / "ck").iterdir())) and len(done) < 3  # in flight when it died
    second = PackedGSPF(copy.deepcopy(base), max_resident=2, max_rows=7, checkpoints=ck)
    stats = second.run([j for j in _jobs(3) if j.cfg.account not in done], EOS,
                       lambda u, d: done.__setitem__(u.account, d))
    assert stats.get("resumed", 0) >= 1 and sorted(done) == sorted(solo)
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").iterdir())  # finished accounts clean up
    for acct, delta in done.items():
        for name, (idx, vals) in delta.items():
            assert torch.equal(idx, solo[acct][name][0])
            torch.testing.assert_close(vals, solo[acct][name][1], rtol=1e-3, atol=1e-5)


def test_admission_keeps_the_state_budget_and_gives_the_same_deltas():
    base = build_model("tkllm-tiny", seed=0)
    jobs = _jobs(3)
    probe = PackedGSPF(copy.deepcopy(base))
    # Room for one account warming up (dense fp32 sensitivity sums) beside one training: never three.
    budget = probe.pager.state_bytes(jobs[0].cfg, warming=True) + probe.pager.state_bytes(jobs[0].cfg, warming=False)
    engine = PackedGSPF(copy.deepcopy(base), max_resident=10, max_rows=7, state_budget=budget)
    done = {}
    stats = engine.run(jobs, EOS, lambda u, d: done.__setitem__(u.account, d))
    assert stats["max_resident"] == 2 and len(done) == 3  # the others waited for memory, then ran
    for job in _jobs(3):
        ref = train_account(job.cfg, copy.deepcopy(base), EOS, job.train_posts, job.eval_posts, progress=False).delta
        for name, (idx, vals) in done[job.cfg.account].items():
            assert torch.equal(idx, ref[name][0])


def _run(base, jobs, **kw) -> tuple[dict, dict]:
    done = {}
    stats = PackedGSPF(copy.deepcopy(base), max_resident=len(jobs), **kw).run(
        jobs, EOS, lambda u, d: done.__setitem__(u.account, d))
    return stats, done


def _paged_run(base, jobs, device_states: int, max_rows: int = 7):
    """Room on the device for one warm-up and `device_states` trained states; the rest paged out
    (at density 5% four trained states need more than that room)."""
    probe, cfg = PackedGSPF(copy.deepcopy(base)), jobs[0].cfg
    state = probe.pager.state_bytes(cfg, warming=False)
    budget = probe.pager.state_bytes(cfg, warming=True) - state + device_states * state
    return _run(base, jobs, max_rows=max_rows, state_budget=budget, host_budget=1 << 34)


def test_paging_to_host_holds_more_accounts_than_the_device_budget_and_keeps_the_math():
    base = build_model("tkllm-tiny", seed=0)
    # One account per micro-batch (max_rows = batch_size): each account's arithmetic is then the
    # same whatever runs beside it, so paging must leave the deltas bit-identical.
    stats, paged = _paged_run(base, _jobs(4, density=0.05), device_states=1, max_rows=3)
    assert stats["max_resident"] == 4 and len(paged) == 4  # all in flight at once, not queued
    assert stats["paged_out"] > 0 and stats["paged_in"] > 0 and stats["max_states_on_device"] < 4
    _, kept = _run(base, _jobs(4, density=0.05), max_rows=3)
    for acct, delta in kept.items():
        assert sorted(paged[acct]) == sorted(delta)
        for name, (idx, vals) in delta.items():
            assert paged[acct][name][0].dtype == torch.int64
            assert torch.equal(paged[acct][name][0], idx) and torch.equal(paged[acct][name][1], vals)


def test_paging_needs_a_device_budget():
    with pytest.raises(ValueError, match="needs a device state_budget"):
        PackedGSPF(build_model("tkllm-tiny", seed=0), host_budget=1 << 30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_on_cuda_bf16_runs_the_triton_path_and_agrees_with_solo_in_fp32():
    base = build_model("tkllm-tiny", seed=0).cuda()
    solo = {j.cfg.account: train_account(j.cfg, copy.deepcopy(base), EOS, j.train_posts, j.eval_posts,
                                         progress=False).delta for j in _jobs(3)}
    done = {}
    PackedGSPF(copy.deepcopy(base), max_resident=3, max_rows=7).run(_jobs(3), EOS,
                                                                     lambda u, d: done.__setitem__(u.account, d))
    for acct, delta in done.items():  # fp32 on the GPU: the Triton kernels against the solo path
        for name, (idx, vals) in delta.items():
            ref_idx, ref_vals = solo[acct][name]
            # GPU GEMMs of other shapes sum in other orders: an entry at the threshold may flip.
            mine, theirs = torch.isin(idx, ref_idx), torch.isin(ref_idx, idx)
            assert int(mine.sum()) >= 0.99 * ref_idx.numel()
            torch.testing.assert_close(vals[mine], ref_vals[theirs], rtol=1e-2, atol=1e-4)
    bf16 = {}
    PackedGSPF(copy.deepcopy(base).to(torch.bfloat16), max_resident=3, max_rows=7).run(
        _jobs(3), EOS, lambda u, d: bf16.__setitem__(u.account, d))
    assert sorted(bf16) == sorted(solo) and all(torch.isfinite(v).all() for d in bf16.values() for _, v in d.values())
    done = {}
    PackedGSPF(copy.deepcopy(base), max_resident=3, max_rows=7).run(_jobs(3, density=0.05), EOS,
                                                                     lambda u, d: done.__setitem__(u.account, d))
    stats, paged = _paged_run(base, _jobs(3, density=0.05), device_states=1)  # pinned host memory, asynchronous copies
    assert stats["paged_out"] > 0
    for acct, delta in paged.items():  # the same fp32 run as `done` above, only paged in between
        kept = 0
        for name, (idx, vals) in delta.items():
            # Paging changes which users share a micro-batch, and cuBLAS sums a row's GEMM in an
            # order that depends on the batch's shape: a warm-up's entry at the threshold may flip,
            # and Adam turns last-bit differences in a near-zero gradient into a step's worth of a
            # few values. Lost or misplaced paged data would move whole modules.
            if name not in done[acct]:
                continue
            ref_idx, ref_vals = done[acct][name]
            mine, theirs = torch.isin(idx, ref_idx), torch.isin(ref_idx, idx)
            kept += int(mine.sum())
            if mine.any():
                a, b = vals[mine], ref_vals[theirs]
                assert torch.isclose(a, b, rtol=1e-4, atol=1e-6).float().mean() >= 0.75  # most agree to ~1e-4
                assert ((a - b).abs() <= 1e-3).float().mean() >= 0.99
                torch.testing.assert_close(a, b, rtol=0, atol=3e-2)  # at most a few Adam steps (lr 1e-2)
        total = sum(i.numel() for i, _ in done[acct].values())  # a module lost in paging counts as lost
        assert kept >= 0.99 * total


def test_a_result_lost_after_publishing_is_rebuilt_from_the_manifest(tmp_path):
    import json

    from tkllm_ray.models import fingerprint
    from tkllm_ray.sparse.delta_store import save_delta
    from tkllm_ray.train.packed_job import _recover_result

    out, run_dir = str(tmp_path / "deltas"), str(tmp_path / "run")
    base = build_model("tkllm-tiny", seed=0)
    version = save_delta(out, "a1", {"lm_head": (torch.tensor([2, 4]), torch.ones(2))}, "tkllm-tiny", fingerprint(base),
                         "gspf", 0.01, metrics={"eval_ppl_after": 12.5, "steps": 7}, run_id="r1")
    cfg = FinetuneConfig(accounts="all", data="-", output=out)
    _recover_result(cfg, "a1", run_dir)
    result = json.loads((tmp_path / "run" / "results" / "a1.json").read_text())
    assert result == {"account": "a1", "method": "gspf", "eval_ppl_after": 12.5, "steps": 7, "version": version,
                      "delta_uri": f"{out}/a1/{version}"}


def test_training_fills_micro_batches_oldest_first_and_warm_ups_round_robin():
    engine = PackedGSPF(build_model("tkllm-tiny", seed=0), max_resident=3, max_rows=7)
    users = ["a", "b", "c"]  # each brings a 3-row batch: two fit in 7 rows
    rows = lambda u: (torch.zeros(3, 4),)  # noqa: E731
    oldest = [[u for u, _ in engine._fill(users, rows, rotate=False)] for _ in range(3)]
    turns = [[u for u, _ in engine._fill(users, rows)] for _ in range(3)]
    assert oldest == [["a", "b"]] * 3
    assert {u for t in turns for u in t} == {"a", "b", "c"} and turns[0] != turns[1]
    firsts = []  # training fills between warm-up fills do not move the warm-ups' start
    for _ in range(3):
        engine._fill(users, rows, rotate=False)
        firsts.append(engine._fill(users, rows)[0][0])
    assert firsts == [users[(engine._rr - 3 + i) % 3] for i in range(3)] and len(set(firsts)) == 3
