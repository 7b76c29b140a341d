"""Find input files (local or s3://, one file or a directory/prefix) and parse them into rows.

Files are read as bytes and parsed here rather than by pyarrow's JSON/CSV readers so that a
bad row (broken JSON, ragged CSV, non-UTF-8 bytes) is quarantined alone instead of failing
the whole file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from tkllm_ray.data.schema import ROW_SCHEMA
from tkllm_ray.data.validate import RowRules, quarantined, record_to_row
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import list_files

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".pq": "parquet"}


def detect_format(uri: str) -> str | None:
    name = uri.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return FORMATS.get(os.path.splitext(name)[1])


def resolve_input_files(uri: str, fmt: str = "auto", options=None) -> tuple[list[tuple[str, str]], list[str]]:
    """[(file uri, format)] under `uri`, and the files skipped for an unknown extension.
    A named file of unknown format, or a directory with no readable file, is an error."""
    files = list_files(uri, options)
    chosen, skipped = [], []
    for f in files:
        kind = fmt if fmt != "auto" else detect_format(f)
        if kind is None:
            if f == uri:
                raise TkllmError(
                    f"cannot read {uri}: unknown format; use .jsonl/.json/.csv/.tsv/.parquet (optionally .gz) "
                    "or set the input's format"
                )
            skipped.append(f)
        else:
            chosen.append((f, kind))
    if not chosen:
        raise TkllmError(f"no readable files under {uri} (looked for .jsonl/.json/.csv/.tsv/.parquet)")
    return chosen, skipped


def parse_file(data: bytes, source: str, fmt: str, rules: RowRules) -> pa.Table:
    """All rows of one file as a ROW_SCHEMA table (clean and quarantined rows together)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    try:
        rows = list(_iter_rows(data, source, fmt, rules))
    except TkllmError:
        raise
    except Exception as e:  # the file as a whole is unreadable: name it
        raise TkllmError(f"cannot read {source} as {fmt}: {type(e).__name__}: {e}") from None
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _iter_rows(data: bytes, source: str, fmt: str, rules: RowRules):
    if fmt == "parquet":
        table = pq.read_table(io.BytesIO(data))
        for i, rec in enumerate(table.to_pylist()):
            yield record_to_row(rec, source, i, rules)
        return
    # Undecodable bytes become lone surrogates, caught per row as non_utf8.
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    if fmt == "json" and text.lstrip().startswith("["):
        for i, rec in enumerate(json.loads(text)):
            yield record_to_row(rec, source, i, rules)
    elif fmt in ("json", "jsonl"):
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield quarantined(source, i, "malformed_row", f"invalid JSON: {e.msg}", line)
                continue
            yield record_to_row(rec, source, i, rules)
    elif fmt in ("csv", "tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
        if not reader.fieldnames:
            raise TkllmError(f"cannot read {source} as {fmt}: no header row")
        for i, rec in enumerate(reader):
            if None in rec or None in rec.values():
                yield quarantined(source, i, "malformed_row", "row has a different number of fields than the header", rec)
                continue
            yield record_to_row({k: (v if v != "" else None) for k, v in rec.items()}, source, i, rules)
    else:
        raise TkllmError(f"unknown input format {fmt!r} for {source}")
