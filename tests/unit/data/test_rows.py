"""Field mapping, normalisation and every quarantine reason, on records as exports write them."""

from datetime import datetime, timezone

import pytest

from tkllm_ray.data.fields import parse_count, parse_hashtags, parse_timestamp
from tkllm_ray.data.normalize import dedupe_key, normalize_text
from tkllm_ray.data.schema import QUARANTINE_REASONS, validate_account_id
from tkllm_ray.data.validate import RowRules, record_to_row
from tkllm_ray.errors import TkllmError

RULES = RowRules()


def row(rec, rules=RULES):
    return record_to_row(rec, "src.jsonl", 7, rules)


def test_tiktok_export_fields_are_mapped_and_unknown_columns_kept():
    r = row({"id": "123", "desc": "Fit check 🔥 #ootd #OOTD", "createTime": 1700000000,
             "authorMeta": {"name": "@ana.b", "verified": True}, "challenges": [{"title": "fashion"}],
             "playCount": "304.9K", "diggCount": 1200, "musicMeta": {"musicName": "orig"}})
    assert r["quarantine_reason"] is None
    assert (r["account_id"], r["post_id"], r["text"]) == ("ana.b", "123", "Fit check 🔥 #ootd #OOTD")
    assert r["hashtags"] == ["fashion", "ootd"]  # case-insensitive union, challenges first
    assert r["created_at"] == datetime(2023, 11, 14, 22, 13, 20, tzinfo=timezone.utc)
    assert (r["views"], r["likes"]) == (304_900, 1200)
    assert '"authorMeta.verified": true' in r["extra"] and "musicMeta.musicName" in r["extra"]


def test_scraper_csv_names_map_too():
    r = row({"vid_id": "9", "user_name": "lenguyentravi", "vid_caption": "Giấc mơ 🤷🏻",
             "vid_postTime": "2025-05-21 09:44:45", "vid_hashtags": "xuhuong, trend", "vid_nview": "1.4M"})
    assert r["account_id"] == "lenguyentravi" and r["hashtags"] == ["xuhuong", "trend"]
    assert r["views"] == 1_400_000 and r["created_at"].year == 2025


@pytest.mark.parametrize("rec,reason", [
    ({"text": "hi"}, "missing_account"),
    ({"account_id": "bad id/../x", "text": "hi"}, "invalid_account_id"),
    ({"account_id": "..", "text": "hi"}, "invalid_account_id"),
    ({"account_id": "a", "title": None}, "missing_text"),
    ({"account_id": "a", "text": "caf\udce9 au lait"}, "non_utf8"),
    ({"account_id": "a", "text": " \x00\x07 \n\t "}, "empty_after_normalization"),
    ({"account_id": "a", "text": "x" * 10_001}, "too_long"),
    ({"account_id": "a", "text": "hi", "created_at": "last tuesday"}, "bad_timestamp"),
    ({"account_id": "a", "text": "hi", "created_at": 1476391}, "bad_timestamp"),  # 1970: wrong unit
    ({"account_id": "a", "text": "hi", "created_at": "2999-01-01"}, "bad_timestamp"),
])
def test_each_quarantine_reason(rec, reason):
    r = row(rec)
    assert r["quarantine_reason"] == reason
    assert r["source"] == "src.jsonl" and r["source_row"] == 7 and r["raw"]
    assert r["text"] is None  # quarantined rows carry the raw record, not a cleaned post


def test_every_declared_reason_is_reachable():
    tested = {"missing_account", "invalid_account_id", "missing_text", "non_utf8",
              "empty_after_normalization", "too_long", "bad_timestamp", "malformed_row"}
    assert set(QUARANTINE_REASONS) == tested  # malformed_row: see test_readers


def test_timestamp_units():
    assert parse_timestamp(1476391, "ks").year == 2016
    assert parse_timestamp(1700000000000).year == 2023  # ms inferred
    assert parse_timestamp("2021-06-07T19:42:19Z").tzinfo is not None
    assert row({"account_id": "a", "text": "x", "created_at": 1476391}, RowRules(timestamp_unit="ks"))["created_at"].year == 2016


def test_normalisation_keeps_style():
    raw = "OMG\r\nthis is 🔥🔥\x1b[31m  \n\n\n\nZWJ 👩\u200d💻 𝓯𝓪𝓷𝓬𝔂 #Tag\t!"
    out = normalize_text(raw)
    assert out == "OMG\nthis is 🔥🔥[31m\n\nZWJ 👩\u200d💻 𝓯𝓪𝓷𝓬𝔂 #Tag !"
    assert dedupe_key("Hello   WORLD!!") == dedupe_key("hello world")


def test_counts_and_hashtags_parsing():
    assert [parse_count(v) for v in ["1,234", "304.9K", "2M", "n/a", None, 7.0]] == [1234, 304900, 2_000_000, None, None, 7]
    assert parse_hashtags("['a', 'b']") == ["a", "b"]
    assert parse_hashtags("#a #b") == ["a", "b"]
    assert parse_hashtags([{"name": "x"}, "#y"]) == ["x", "y"]


def test_account_id_validation_message():
    assert validate_account_id("ok_name.1-2") == "ok_name.1-2"
    with pytest.raises(TkllmError, match=r"invalid account id '\.\./etc'"):
        validate_account_id("../etc")


def test_builtin_tokenizer_ships_small_and_roundtrips_style():
    from tkllm_ray.data.tokenizer import BUILTIN_DIR, load_tokenizer

    size = sum(p.stat().st_size for p in BUILTIN_DIR.iterdir())
    assert size < 2 * 1024 * 1024
    tok = load_tokenizer("builtin")
    text = "OMG 🔥 #ootd 今天也要加油\nGiấc mơ"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 8192
