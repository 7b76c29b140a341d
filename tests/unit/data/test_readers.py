"""Each input format parsed to the same rows; bad rows quarantined alone; unreadable inputs named."""

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tkllm_ray.data.readers import parse_file, resolve_input_files
from tkllm_ray.data.validate import RowRules
from tkllm_ray.errors import TkllmError

RECORDS = [
    {"account_id": "ana", "post_id": "1", "text": "first 🔥 #a", "created_at": "2024-01-01T10:00:00Z", "mood": "x"},
    {"account_id": "ana", "post_id": "2", "text": "second 中文", "created_at": "2024-01-02T10:00:00Z", "mood": "y"},
]


def _jsonl():
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS).encode()


def _csv():
    lines = ["account_id,post_id,text,created_at,mood"]
    lines += [f'{r["account_id"]},{r["post_id"]},"{r["text"]}",{r["created_at"]},{r["mood"]}' for r in RECORDS]
    return ("\n".join(lines) + "\n").encode()


def _parquet():
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(RECORDS), buf)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,data", [("jsonl", _jsonl()), ("csv", _csv()), ("parquet", _parquet()),
                                      ("json", json.dumps(RECORDS).encode()), ("jsonl", gzip.compress(_jsonl()))])
def test_formats_give_identical_rows(fmt, data):
    t = parse_file(data, f"in.{fmt}", fmt, RowRules())
    rows = t.to_pylist()
    assert [r["text"] for r in rows] == ["first 🔥 #a", "second 中文"]
    assert [r["post_id"] for r in rows] == ["1", "2"]
    assert all(r["quarantine_reason"] is None for r in rows)
    assert json.loads(rows[0]["extra"]) == {"mood": "x"}
    assert rows[0]["hashtags"] == ["a"]


def test_bad_rows_are_quarantined_alone():
    data = _jsonl() + b'{"account_id": "ana", "text": broken json\n' + b'{"account_id":"ana","text":"caf\xe9"}\n'
    rows = parse_file(data, "in.jsonl", "jsonl", RowRules()).to_pylist()
    assert [r["quarantine_reason"] for r in rows] == [None, None, "malformed_row", "non_utf8"]
    ragged = b"account_id,text\nana,hello\nana,hello,extra,fields\nbob\n"
    rows = parse_file(ragged, "in.csv", "csv", RowRules()).to_pylist()
    assert [r["quarantine_reason"] for r in rows] == [None, "malformed_row", "malformed_row"]


def test_unreadable_inputs_are_named(tmp_path):
    with pytest.raises(TkllmError, match="no such file or directory: .*nope"):
        resolve_input_files(str(tmp_path / "nope"))
    bad = tmp_path / "posts.xlsx"
    bad.write_bytes(b"PK")
    with pytest.raises(TkllmError, match="posts.xlsx: unknown format"):
        resolve_input_files(str(bad))
    with pytest.raises(TkllmError, match=r"cannot read broken.parquet as parquet"):
        parse_file(b"not parquet at all", "broken.parquet", "parquet", RowRules())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(TkllmError, match="no readable files"):
        resolve_input_files(str(tmp_path / "d"))


def test_directory_inputs_list_supported_files_and_skip_others(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(_jsonl())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.csv.gz").write_bytes(gzip.compress(_csv()))
    (tmp_path / "README.md").write_text("x")
    files, skipped = resolve_input_files(str(tmp_path))
    assert [(f.rsplit("/", 1)[1], k) for f, k in files] == [("a.jsonl", "jsonl"), ("b.csv.gz", "csv")]
    assert [s.rsplit("/", 1)[1] for s in skipped] == ["README.md"]
