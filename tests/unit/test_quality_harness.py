"""benchmarks/gspf_quality.py: the account split it evaluates on, rank matching and the statistics."""

import math

import pytest

from tkllm_ray.models import build_model


@pytest.fixture(scope="module")
def quality(benchmark_script):
    return benchmark_script("gspf_quality")


def test_accounts_are_the_issue_s_and_hold_out_the_newest_fifth(quality, shared_data):
    if not (shared_data / "tiktok-accounts-dev.csv").is_file():
        pytest.skip("shared data absent")
    acc = quality.load_accounts(shared_data)
    assert len(acc["tiktok"]) == 12 and len(acc["tweets"]) == 20
    for train, held_out in [*acc["tiktok"].values(), *acc["tweets"].values()]:
        n = len(train) + len(held_out)
        assert len(held_out) == math.ceil(0.2 * n) and n >= 100
    assert len(quality.load_accounts(shared_data, limit=2)["tweets"]) == 2


def test_lora_rank_matches_the_gspf_budget(quality):
    model = build_model("tkllm-tiny")
    per_rank = sum(m.in_features + m.out_features for m in model.modules() if m.__class__.__name__ == "Linear")
    assert quality.lora_rank_matching(model, 3 * per_rank + 10) == 3
    assert quality.lora_rank_matching(model, 5) == 1  # never below rank 1


def test_ci_and_gain_ratio(quality):
    mean, half = quality.ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.30 * 1.0 / math.sqrt(3))
    rows = [{"dataset": "a", "base": 10.0, "full": 6.0, "lora": 8.0, "gspf": 7.0},
            {"dataset": "b", "base": 20.0, "full": 10.0, "lora": 16.0, "gspf": 12.0}]
    s = quality.summarize(rows, ["full", "lora", "gspf"])
    assert s["all"]["gspf_gain_ratio_vs_full"] == pytest.approx((3 + 8) / (4 + 10))
    assert s["a"]["gspf_gain_ratio_vs_lora"] == pytest.approx(3 / 2)
    assert s["b"]["accounts"] == 1
