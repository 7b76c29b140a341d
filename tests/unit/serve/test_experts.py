"""MoE style experts: trained on genre-grouped synthetic posts, the router sends held-out posts to
their genre and each expert lowers its genre's held-out perplexity; the format round-trips through
a store; a request's delta (account + weighted experts) serves exactly what the base with both
merged in generates."""

import copy

import pytest
import torch

from tkllm_ray.config.finetune import FinetuneConfig
from tkllm_ray.errors import TkllmError
from tkllm_ray.models import build_model, fingerprint
from tkllm_ray.serve.engine import DeltaBatchEngine, GenRequest
from tkllm_ray.serve.experts import combine, load_experts, save_experts, train_experts
from tkllm_ray.sparse.model import AppliedDelta
from tkllm_ray.sparse.sensitivity import target_linears

VOCAB = 512
DOMAINS = ["showcase", "vlog", "storytelling"]


def _genre_posts(g: int, n: int, seed: int) -> list[list[int]]:
    """Genre g: posts walk its own band of 100 tokens with its own stride (a style the base has
    never seen), with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    lo, stride, posts = 40 + 150 * g, 3 + 4 * g, []
    for _ in range(n):
        t = int(torch.randint(0, 100, (1,), generator=gen))
        post = []
        for _ in range(16):
            noise = int(torch.randint(0, 5, (1,), generator=gen)) == 0
            t = int(torch.randint(0, 100, (1,), generator=gen)) if noise else (t + stride) % 100
            post.append(lo + t)
        posts.append(post)
    return posts


@pytest.fixture(scope="module")
def trained():
    base = build_model("tkllm-tiny", vocab_size=VOCAB, seed=0)
    cfg = FinetuneConfig(account="x", data="-", method="gspf", epochs=4, density=0.02, lr=3e-3, seq_len=32,
                         batch_size=8, warmup_steps=2, reselect_every=0, device="cpu")
    posts = {d: (_genre_posts(g, 48, g), _genre_posts(g, 12, 100 + g)) for g, d in enumerate(DOMAINS)}
    deltas, weight, bias, metrics = train_experts(cfg, base, 1, posts)
    return base, deltas, weight, bias, metrics, posts


def test_the_router_finds_each_genre_and_each_expert_fits_its_genre(trained):
    base, deltas, weight, bias, metrics, _ = trained
    assert metrics["router_heldout_accuracy"] >= 0.9
    for d in DOMAINS:
        m = metrics["experts"][d]
        assert m["eval_ppl_after"] < 0.8 * m["eval_ppl_before"], (d, m)
        assert set(deltas[d]) <= set(target_linears(base))


def test_experts_round_trip_through_a_store_and_route_and_pin(trained, tmp_path):
    base, deltas, weight, bias, _, posts = trained
    root = str(tmp_path / "experts")
    fp = fingerprint(base)
    save_experts(root, deltas, weight, bias, "tkllm-tiny", fp, 0.02, top_k=2)
    ex = load_experts(root, fp)
    assert ex.domains == DOMAINS and ex.top_k == 2
    for d in DOMAINS:
        for name, (idx, vals) in deltas[d].items():
            assert torch.equal(ex.deltas[d][name][0], idx)
            torch.testing.assert_close(ex.deltas[d][name][1], vals.to(torch.bfloat16).float())
    embed = base.get_input_embeddings()
    for g, d in enumerate(DOMAINS):
        w = ex.weights(posts[d][1][0], embed, None)
        assert len(w) == 2 and max(w, key=w.get) == d and sum(w.values()) == pytest.approx(1.0)
    assert ex.weights(posts["vlog"][1][0], embed, "storytelling") == {"storytelling": 1.0}
    with pytest.raises(TkllmError, match="unknown style 'cooking'"):
        ex.weights([5, 6], embed, "cooking")
    with pytest.raises(TkllmError, match="trained on base tkllm-tiny, not the loaded base"):
        load_experts(root, "sha256:other")
    with pytest.raises(TkllmError, match="no style experts published"):
        load_experts(str(tmp_path / "none"))
    with pytest.raises(ValueError, match="top_k must be in 1..3"):
        save_experts(root, deltas, weight, bias, "tkllm-tiny", fp, 0.02, top_k=4)


def _dense(model, delta, name):
    w = torch.zeros(target_linears(model)[name].weight.numel())
    if name in delta:
        w.index_add_(0, delta[name][0].long(), delta[name][1].float())
    return w


def test_combine_is_the_entrywise_weighted_sum(trained):
    base, deltas, *_ = trained
    account = {n: (i[::2].clone(), torch.randn(i[::2].numel())) for n, (i, _) in deltas["vlog"].items()}
    weights = {"showcase": 0.7, "storytelling": 0.3}
    out = combine(account, deltas, weights)
    for name in target_linears(base):
        want = _dense(base, account, name) + 0.7 * _dense(base, deltas["showcase"], name) + \
            0.3 * _dense(base, deltas["storytelling"], name)
        got = _dense(base, out, name)
        torch.testing.assert_close(got, want)
        if name in out:
            idx = out[name][0]
            assert bool((idx[1:] > idx[:-1]).all())  # sorted and unique: a valid delta


def test_a_request_with_an_expert_generates_what_the_merged_model_does(trained):
    base, deltas, *_ , posts = trained
    account = {n: (i[1::3].clone(), torch.randn(i[1::3].numel()) * 0.1) for n, (i, _) in deltas["vlog"].items()}
    delta = combine(account, deltas, {"storytelling": 1.0})
    prompt = posts["storytelling"][1][1][:6]
    got = DeltaBatchEngine(copy.deepcopy(base)).generate([GenRequest(prompt, delta, max_tokens=10)])[0]
    merged = copy.deepcopy(base)
    AppliedDelta(merged, account)
    AppliedDelta(merged, deltas["storytelling"])
    want = merged.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=None, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert got == want[0, len(prompt):].tolist()


def test_tkllm_experts_trains_one_expert_per_genre_of_a_dataset(ingested_dataset, tmp_path, capsys):
    import json

    from tkllm_ray.cli.main import main

    data, accounts = ingested_dataset(str(tmp_path / "data"), accounts=3, posts=30, train=24)
    out = str(tmp_path / "experts")
    args = ["--data", data, "--output", out, "--epochs", "2", "--density", "0.01", "--seq-len", "64",
            "--warmup-steps", "2", "--device", "cpu"]
    assert main(["experts", *args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    genres = sorted(a.split("_", 1)[1].rsplit("_", 1)[0] for a in accounts)  # synth_<genre>_NNN
    assert r["domains"] == genres and r["root"] == out
    assert load_experts(out).domains == genres
    one = ingested_dataset(str(tmp_path / "one"), accounts=1, posts=30, train=24)[0]
    assert main(["experts", *args[2:], "--data", one, "--output", str(tmp_path / "x")]) == 1
    assert "style experts need at least 2 genres" in capsys.readouterr().err
