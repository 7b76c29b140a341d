"""The Ray Data stage functions and actor classes of the ingest pipeline (batch in, batch out)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from tkllm_ray.data.accounts import order_key
from tkllm_ray.data.pyramid import plan_account
from tkllm_ray.data.readers import parse_file
from tkllm_ray.data.schema import POST_COLUMNS, QUARANTINE_COLUMNS, ROW_SCHEMA

PLAN_SCHEMA = pa.schema([
    ("account_id", pa.string()), ("mode", pa.string()), ("bucket", pa.int64()), ("canvas_px", pa.int64()),
    ("side_px", pa.int64()), ("visual_tokens", pa.float64()), ("text", pa.string()), ("posts", pa.int64()),
    ("oldest", pa.string()), ("newest", pa.string()),
])


def parse_files(batch: pa.Table, sources: dict, rules: dict) -> pa.Table:
    """read_binary_files rows (bytes, path) -> ROW_SCHEMA rows. `sources`: path -> (uri, format)."""
    tables = []
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        uri, fmt = sources[path]
        tables.append(parse_file(data, uri, fmt, rules[uri]))
    return pa.concat_tables(tables) if tables else ROW_SCHEMA.empty_table()


def only_quarantined(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["quarantine_reason"])).select(QUARANTINE_COLUMNS)


def only_clean(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_null(batch["quarantine_reason"])).select(POST_COLUMNS)


def only_accounts(batch: pa.Table, accounts: list[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch["account_id"], pa.array(accounts, type=pa.string())))


def newest_and_count(group: pa.Table) -> pa.Table:
    """One account's rows -> (account_id, newest created_at, posts)."""
    return pa.table({"account_id": [group["account_id"][0].as_py()], "newest": [pc.max(group["created_at"]).as_py()],
                     "posts": [group.num_rows]})


def only_split(batch: pa.Table, splits: tuple[str, ...], drop_split: bool = False) -> pa.Table:
    out = batch.filter(pc.is_in(batch["split"], pa.array(list(splits))))
    return out.drop_columns(["split"]) if drop_split else out


class Tokenize:
    """Actor: loads the tokenizer once, adds input_ids and num_tokens."""

    def __init__(self, spec: str):
        from tkllm_ray.data.tokenizer import load_tokenizer

        self.tok = load_tokenizer(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = self.tok(batch.column("text").to_pylist(), add_special_tokens=False)["input_ids"]
        batch = batch.append_column("input_ids", pa.array(ids, type=pa.list_(pa.int32())))
        return batch.append_column("num_tokens", pa.array([len(i) for i in ids], type=pa.int64()))


def plan_group(group: pa.Table, modes: list[str], first_bucket_posts: int, num_buckets: int, summary: bool) -> pa.Table:
    rows = group.select(["account_id", "text", "created_at", "hashtags", "position", "source", "source_row"]).to_pylist()
    rows.sort(key=order_key, reverse=True)  # newest first
    plans = plan_account(rows[0]["account_id"], rows, modes, first_bucket_posts, num_buckets, summary)
    return pa.Table.from_pylist([p.__dict__ for p in plans], schema=PLAN_SCHEMA)


class RenderImages:
    """Actor: renders planned images, writes PNGs under `images_uri`, returns one metadata row
    per image (the rendered text is replaced by its counts)."""

    def __init__(self, images_uri: str, tokenizer: str, fonts: list[str] | None, storage: dict | None):
        from tkllm_ray.config.storage import StorageOptions
        from tkllm_ray.data.fonts import FontChain
        from tkllm_ray.data.tokenizer import load_tokenizer

        self.images_uri = images_uri
        self.chain = FontChain(fonts)
        self.tok = load_tokenizer(tokenizer)
        self.storage = StorageOptions(**(storage or {}))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from tkllm_ray.data.render import png_bytes, render_text
        from tkllm_ray.storage import join, write_bytes

        out = []
        for plan in batch.to_pylist():
            t0 = time.perf_counter()
            r = render_text(self.chain, plan["text"], plan["canvas_px"], plan["side_px"])
            name = f"{plan['mode']}-{'summary' if plan['bucket'] < 0 else 'b%d' % plan['bucket']}.png"
            uri = join(self.images_uri, plan["account_id"], name)
            write_bytes(uri, png_bytes(r.image), self.storage)
            shown = plan["text"][: r.chars_rendered]
            text_tokens = len(self.tok(shown, add_special_tokens=False)["input_ids"])
            row = {k: v for k, v in plan.items() if k != "text"}
            row.update(
                uri=uri, chars_total=len(plan["text"]), chars_rendered=r.chars_rendered, text_tokens=text_tokens,
                compression_ratio=text_tokens / plan["visual_tokens"], font_px=r.font_px,
                render_s=time.perf_counter() - t0,
            )
            out.append(row)
        return pa.Table.from_pylist(out)
