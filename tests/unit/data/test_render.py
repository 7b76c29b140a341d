"""Glyphs really drawn (emoji, CJK, Vietnamese), text fitting, and the forgetting pyramid's budgets."""

from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image

from tkllm_ray.data.fonts import FontChain
from tkllm_ray.data.pyramid import MODES, SUMMARY_BUCKET, plan_account, side_for_budget, visual_tokens
from tkllm_ray.data.render import ink_fraction, render_text

MISSING = "\U0010fffd"  # private use: no font has it, so it draws the missing-glyph box


@pytest.fixture(scope="module")
def chain():
    return FontChain()


def glyph(chain, text, size=48):
    img = Image.new("RGB", (4 * size, 2 * size), "white")
    chain.draw(img, (4, 4), text, size)
    return img


def _diff(a, b):
    pa, pb = list(a.convert("L").getdata()), list(b.convert("L").getdata())
    return sum(abs(x - y) > 40 for x, y in zip(pa, pb)) / len(pa)


@pytest.mark.parametrize("text", ["😀", "🔥", "中", "文", "ấ", "ơ"])
def test_glyphs_are_drawn_not_boxes(chain, text):
    img, box = glyph(chain, text), glyph(chain, MISSING)
    assert ink_fraction(img) > 0.01, "blank glyph"
    assert _diff(img, box) > 0.02, f"{text!r} rendered as the missing-glyph box"


def test_emoji_come_out_in_colour(chain):
    img = glyph(chain, "🔥").convert("RGB")
    saturated = sum(1 for r, g, b in img.getdata() if max(r, g, b) - min(r, g, b) > 80)
    assert saturated > 50  # the colour emoji font, not a monochrome outline


def test_font_fallback_picks_a_face_per_script(chain):
    faces = [face.path.rsplit("/", 1)[1] for _, face in chain.runs("Hi 中文 🔥")]
    assert faces == ["DejaVuSans.ttf", "wqy-microhei.ttc", "DejaVuSans.ttf", "NotoColorEmoji.ttf"]


def test_text_shrinks_to_fit_and_overflow_is_counted(chain):
    short = render_text(chain, "hello world", 512, 512)
    assert short.chars_rendered == len("hello world") and short.font_px >= 20
    long_text = "\n".join(f"line {i} with some words in it" for i in range(400))
    r = render_text(chain, long_text, 512, 256)
    assert r.image.size == (256, 256)
    assert 0 < r.chars_rendered < len(long_text)
    assert r.font_px == max(8, int(512 / 80))


def test_visual_token_formula_matches_deepencoder_modes():
    assert {m: visual_tokens(px) for m, px in MODES.items()} == {"tiny": 64, "base": 256, "hifi": 400}
    assert side_for_budget(256) == 1024 and side_for_budget(64) == 512


def _posts(n):
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [{"text": f"post {i} #tag{i % 3} 🔥", "created_at": t0 - timedelta(days=i), "hashtags": [f"tag{i % 3}"]}
            for i in range(n)]  # newest first


def test_forgetting_pyramid_budgets_halve_per_bucket():
    plans = plan_account("ana", _posts(200), ["base", "tiny"], first_bucket_posts=8, num_buckets=3, summary=True)
    base = [p for p in plans if p.mode == "base"]
    assert [(p.bucket, p.posts, p.visual_tokens) for p in base] == [
        (0, 8, 256), (1, 16, 128), (2, 32, 64), (SUMMARY_BUCKET, 144, 32)]
    for p in base:  # each image's side gives (close to) its budget: halving tokens ~ side / sqrt(2)
        assert abs(visual_tokens(p.side_px) - p.visual_tokens) / p.visual_tokens < 0.1
    assert [p.visual_tokens for p in plans if p.mode == "tiny"] == [64, 32, 16, 8]
    # Newest posts in bucket 0; the buckets cover disjoint, older and older stretches.
    assert base[0].newest == "2024-01-01" and base[0].oldest > base[1].newest > base[2].newest


def test_short_history_uses_fewer_buckets_and_no_summary():
    plans = plan_account("ana", _posts(10), ["base"], first_bucket_posts=8, num_buckets=3, summary=True)
    assert [(p.bucket, p.posts) for p in plans] == [(0, 8), (1, 2)]


def test_style_summary_names_tags_emoji_and_cadence():
    plans = plan_account("ana", _posts(60), ["tiny"], first_bucket_posts=4, num_buckets=2, summary=True)
    summary = plans[-1]
    assert summary.bucket == SUMMARY_BUCKET and summary.posts == 48
    assert "#tag0" in summary.text and "🔥" in summary.text and "posts/day" in summary.text
