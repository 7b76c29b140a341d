"""benchmarks/pretrain_base.py: a few steps of the cpu size on the first 3,000 tweets of the corpus."""

import json

import pytest


def test_pretrain_cpu_saves_a_loadable_base_that_learned(shared_data, tmp_path, benchmark_script):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    corpus = shared_data / "tweets-corpus.txt"
    if not corpus.is_file():
        pytest.skip(f"{corpus} is absent")
    with open(corpus, encoding="utf-8") as f:
        head = [next(f) for _ in range(3000)]
    small = tmp_path / "corpus.txt"
    small.write_text("".join(head), encoding="utf-8")
    out = tmp_path / "base"

    r = benchmark_script("pretrain_base").pretrain_base(str(small), str(out), size="cpu", steps=10, device="cpu", progress=False)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "corpus.txt"]  # the temp dir was renamed
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.get_input_embeddings().num_embeddings == r["vocab_size"]
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert sum(p.numel() for p in model.parameters()) == r["model"]["params"]
    assert r["val_ppl_after"] < r["val_ppl_before"]
    assert r["steps"] == 10 and r["tokens_seen"] == 10 * r["batch_size"] * r["seq_len"]
    saved = json.loads((out / "pretrain.json").read_text())
    assert saved == json.loads(json.dumps(r))
    for key in ("size", "model", "vocab_size", "steps", "tokens_seen", "train_s", "tokens_per_s", "val_ppl_before",
                "val_ppl_after", "loss_curve", "device", "seed", "wall_s"):
        assert key in saved
    assert saved["loss_curve"] and saved["loss_curve"][-1][0] == 10
