"""The ingest job end to end on a real local Ray cluster: local paths and a real S3 server."""

import io
import json

import pyarrow.dataset as pads
import pytest
from PIL import Image

from tkllm_ray.config.ingest import IngestConfig, InputSpec, RenderConfig
from tkllm_ray.data.ingest import run_ingest
from tkllm_ray.data.synth import generate_records, write_jsonl
from tkllm_ray.storage import join, read_bytes, read_latest, resolve_latest

pytestmark = pytest.mark.ray

BAD_LINES = [
    '{"account_id": "ana_b", "text": "no closing brace"\n',  # malformed_row
    '{"text": "who posted this"}\n',  # missing_account
    '{"account_id": "ana b!", "text": "x"}\n',  # invalid_account_id
    '{"account_id": "ana_b"}\n',  # missing_text
    '{"account_id": "ana_b", "text": "\\u0000\\u0007"}\n',  # empty_after_normalization
    '{"account_id": "ana_b", "text": "' + "x" * 10_050 + '"}\n',  # too_long
    '{"account_id": "ana_b", "text": "when?", "created_at": "yesterday-ish"}\n',  # bad_timestamp
]


def _inputs(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(generate_records(n_accounts=3, posts_per_account=40, seed=1), str(raw / "synth.jsonl"))
    lines = [json.dumps({"account_id": "ana_b", "post_id": str(i), "text": f"post {i} 🔥 #ana",
                         "created_at": f"2024-02-{i + 1:02d}T12:00:00Z"}, ensure_ascii=False) + "\n"
             for i in range(25)]
    lines.append(json.dumps({"account_id": "ana_b", "post_id": "dup", "text": "POST 3 🔥 #ana",
                             "created_at": "2024-03-01T00:00:00Z"}, ensure_ascii=False) + "\n")
    data = "".join(lines + BAD_LINES).encode() + b'{"account_id": "ana_b", "text": "caf\xe9"}\n'
    (raw / "ana.jsonl").write_bytes(data)
    (raw / "few.csv").write_text("username,description,creation_time\nshorty,only one post,1700000000\n")
    return raw


def _check_dataset(vuri, options, summary):
    assert summary["quarantined"] == {
        "malformed_row": 1, "missing_account": 1, "invalid_account_id": 1, "missing_text": 1,
        "non_utf8": 1, "empty_after_normalization": 1, "too_long": 1, "bad_timestamp": 1}
    assert summary["duplicates"]["normalized"] == 1  # "POST 3 🔥 #ana" vs "post 3 🔥 #ana"
    assert summary["accounts"]["skipped_below_min_posts"] == ["shorty"]
    per = {a["account_id"]: a for a in summary["per_account"]}
    assert set(per) == {"ana_b", "synth_product_showcase_000", "synth_vlog_001", "synth_storytelling_002"}
    assert (per["ana_b"]["train"], per["ana_b"]["eval"]) == (20, 5)
    assert summary["posts_read"] == 120 + 26 + len(BAD_LINES) + 1 + 1
    from tkllm_ray.storage import filesystem_for

    fs, path = filesystem_for(join(vuri, "train"), options)
    train = pads.dataset(path, filesystem=fs, partitioning="hive").to_table()
    fs, path = filesystem_for(join(vuri, "eval"), options)
    evals = pads.dataset(path, filesystem=fs, partitioning="hive").to_table()
    ana_train = [r for r in train.to_pylist() if r["account_id"] == "ana_b"]
    ana_eval = [r for r in evals.to_pylist() if r["account_id"] == "ana_b"]
    assert max(r["created_at"] for r in ana_train) < min(r["created_at"] for r in ana_eval)
    assert all(r["num_tokens"] == len(r["input_ids"]) > 0 for r in ana_train)
    assert sum(r["num_tokens"] for r in train.to_pylist()) == summary["tokens"]["train"]
    fs, path = filesystem_for(join(vuri, "quarantine"), options)
    q = pads.dataset(path, filesystem=fs).to_table()
    assert q.num_rows == 8 and set(q.column("quarantine_reason").to_pylist()) == set(summary["quarantined"])
    png = read_bytes(join(vuri, "images", "ana_b", "tiny-b0.png"), options)
    assert Image.open(io.BytesIO(png)).size == (512, 512)
    fs, path = filesystem_for(join(vuri, "images", "manifest"), options)
    manifest = pads.dataset(path, filesystem=fs).to_table().to_pylist()
    ana = sorted((m["bucket"], m["visual_tokens"]) for m in manifest if m["account_id"] == "ana_b")
    assert ana == [(0, 64.0), (1, 32.0)]  # 20 train posts: 8 + 12, no summary needed
    assert all(m["compression_ratio"] == m["text_tokens"] / m["visual_tokens"] for m in manifest)


def test_ingest_local(ray_local, tmp_path):
    cfg = IngestConfig(inputs=[str(_inputs(tmp_path))], output=str(tmp_path / "out"),
                       render=RenderConfig(modes=["tiny"]))
    summary = run_ingest(cfg, progress=False)
    vuri = resolve_latest(str(tmp_path / "out"))
    assert vuri.endswith(summary["version"])
    _check_dataset(vuri, None, summary)
    assert json.loads((tmp_path / "out" / summary["version"] / "summary.json").read_text())["posts_read"] == summary["posts_read"]
    # A second run publishes a new version; the first stays intact.
    summary2 = run_ingest(cfg, progress=False)
    assert read_latest(str(tmp_path / "out")) == summary2["version"] != summary["version"]
    assert (tmp_path / "out" / summary["version"] / "_COMPLETE").exists()


@pytest.mark.s3
def test_ingest_s3_to_s3(ray_local, tmp_path, s3_server, s3_bucket):
    raw = _inputs(tmp_path)
    client = s3_server.client()
    for f in raw.iterdir():
        client.put_object(Bucket=s3_bucket, Key=f"exports/{f.name}", Body=f.read_bytes())
    cfg = IngestConfig(inputs=[InputSpec(uri=f"s3://{s3_bucket}/exports/")], output=f"s3://{s3_bucket}/datasets/posts",
                       render=RenderConfig(modes=["tiny"]), storage=s3_server.options())
    summary = run_ingest(cfg, progress=False)
    vuri = resolve_latest(f"s3://{s3_bucket}/datasets/posts", s3_server.options())
    _check_dataset(vuri, s3_server.options(), summary)
    latest = client.get_object(Bucket=s3_bucket, Key="datasets/posts/LATEST")["Body"].read().decode()
    assert latest == summary["version"]


def test_real_tiktok_export_ingests(ray_local, tmp_path, shared_data):
    cfg = IngestConfig(inputs=[InputSpec(uri=str(shared_data / "tiktok-accounts-dev.csv"), timestamp_unit="ks")],
                       output=str(tmp_path / "out"), min_posts=100, render=RenderConfig(enabled=False))
    summary = run_ingest(cfg, progress=False)
    assert summary["accounts"]["kept"] == 12  # the 12 creators with >= 100 posts
    assert summary["quarantined_total"] == 0
    assert summary["posts_read"] == 5373
