"""The sparse delta format (DESIGN.md "Formats") and its store: deltas/{account}/{version}/
with delta.safetensors + manifest.json, published atomically (LATEST last)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tkllm_ray.data.schema import is_valid_account_id, validate_account_id
from tkllm_ray.errors import TkllmError
from tkllm_ray.storage import exists, join, list_dirs, publish, read_bytes, read_hashed, read_latest, remove, write_bytes

# 3: indices as 16-bit gaps; 2: all modules in two flat tensors; 1: two tensors per module (all read)
FORMAT_VERSION = 3
DELTA, ADAPTERS = "sparse-delta", "ts-adapters"  # what a version holds (manifest "artifact")
VALUE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

Delta = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (sorted flat indices, values)


class FlatDelta(Mapping):
    """A Delta (read-only) whose modules are slices of two flat tensors (`flat`: all indices, all
    values; `layout`: (module, entries) in that order), as decoded from a format-2 or -3 file or
    held by the serving cache: a reader that wants the flat buffers (the serving cache, the slot
    pool) takes them without concatenating 2 x 169 pieces. A module's (indices, values) are views
    made when asked for, not held: a served delta kept ~340 view tensors, which every full garbage
    collection walked (benchmarks/gc_pauses.py)."""

    def __init__(self, idx: torch.Tensor, vals: torch.Tensor, layout: list[tuple[str, int]]):
        self.flat, self.layout = (idx, vals), layout
        self._spans: dict[str, tuple[int, int]] = {}  # module -> (first entry, entries)
        at = 0
        for name, k in layout:
            self._spans[name] = (at, k)
            at += k

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        at, k = self._spans[name]
        return self.flat[0][at:at + k], self.flat[1][at:at + k]

    def __iter__(self):
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def __contains__(self, name: object) -> bool:
        return name in self._spans

    def entries(self, names) -> int:
        """How many entries the modules in `names` hold (no views made)."""
        return sum(k for n, (_, k) in self._spans.items() if n in names)


def encode(delta: Delta, value_dtype: str = "bf16", format_version: int = FORMAT_VERSION) -> bytes:
    """Format 3: every module's values in one tensor, modules in name order, and their indices as
    the gaps between neighbours (a module's first index + 1 for its first), 16 bits each, with a
    table of the rare gaps past 16 bits (position, high bits); the layout in the header's metadata.
    At density 0.3% a gap averages ~330: 4 bytes an entry (bf16 value + gap) instead of 6, so a
    cold load reads a third less. Indices must be sorted and unique within each module.
    `format_version=2` writes the previous format (flat int32 indices; for comparisons and tests)."""
    names = sorted(delta)
    idx = [delta[n][0].detach().cpu().to(torch.int64) for n in names]
    flat_idx = torch.cat(idx) if idx else torch.empty(0, dtype=torch.int64)
    vals = [delta[n][1].detach().cpu().to(VALUE_DTYPES[value_dtype]) for n in names]
    flat_vals = torch.cat(vals) if vals else torch.empty(0, dtype=VALUE_DTYPES[value_dtype])
    layout = [[n, int(i.numel())] for n, i in zip(names, idx)]
    wide = flat_idx.numel() > 0 and int(flat_idx.max()) >= 2**31
    if format_version == 2:
        return st_save({"indices": flat_idx.to(torch.int64 if wide else torch.int32).contiguous(),
                        "values": flat_vals.contiguous()},
                       metadata={"tkllm_delta_format": "2", "layout": json.dumps(layout)})
    if format_version != 3:
        raise ValueError(f"this writer writes delta formats 2 and 3, not {format_version}")
    gaps, jumps = _gaps(flat_idx, [k for _, k in layout])
    return st_save({"gaps": gaps, "jumps": jumps, "values": flat_vals.contiguous()},
                   metadata={"tkllm_delta_format": "3", "layout": json.dumps(layout),
                             "index_dtype": "int64" if wide else "int32"})


def _gaps(flat: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted flat indices (modules one after another) -> (each gap's low 16 bits as int16,
    [J, 2] int64 rows (position, gap >> 16) for the gaps past 16 bits)."""
    prev = torch.empty_like(flat)
    if flat.numel():
        prev[1:] = flat[:-1]
        k = torch.tensor(counts, dtype=torch.int64)
        prev[(k.cumsum(0) - k)[k > 0]] = -1  # a module's first gap counts from -1: its first index + 1
    gap = flat - prev
    if bool((gap < 1).any()):
        raise ValueError("a delta's indices must be sorted and unique within each module")
    low = gap & 0xFFFF
    pos = (gap >> 16).nonzero().flatten()
    return (low - (low >= 2**15).long() * 2**16).to(torch.int16), torch.stack([pos, gap[pos] >> 16], 1)


def expand_indices(gaps: torch.Tensor, jumps: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The flat indices from format 3's gaps, on whatever device they are (a GPU: a few passes
    over 2 bytes an entry, no host sync): a running sum of the gaps, restarted at each module."""
    if gaps.numel() == 0:
        return torch.empty(0, dtype=dtype, device=gaps.device)
    d = gaps.to(torch.int64) & 0xFFFF
    if jumps.numel():
        d.index_add_(0, jumps[:, 0], jumps[:, 1] << 16)
    total = d.cumsum_(0)
    starts = counts.cumsum(0) - counts
    before = torch.where(starts > 0, total[(starts - 1).clamp_min(0)], 0)  # the sum before each module
    return (total - torch.repeat_interleave(before, counts, output_size=gaps.numel()) - 1).to(dtype)


class EncodedDelta:
    """A format-3 delta as read, its indices still gaps: `expand` where it will be used (a serving
    cache copies 4 bytes an entry to the GPU and expands there)."""

    def __init__(self, gaps: torch.Tensor, jumps: torch.Tensor, values: torch.Tensor,
                 layout: list[tuple[str, int]], index_dtype: torch.dtype):
        n = gaps.numel()
        if (gaps.dim() != 1 or gaps.dtype != torch.int16 or values.dim() != 1 or values.numel() != n
                or jumps.dim() != 2 or jumps.shape[1] != 2 or jumps.dtype != torch.int64
                or any(k < 0 for _, k in layout) or sum(k for _, k in layout) != n):
            raise ValueError("delta layout does not match its tensors")
        if jumps.numel() and not bool(((jumps[:, 0] >= 0) & (jumps[:, 0] < n) & (jumps[:, 1] > 0)).all()):
            raise ValueError("delta gap table points outside its entries")
        self.gaps, self.jumps, self.values, self.layout, self.index_dtype = gaps, jumps, values, layout, index_dtype

    def expand(self, device: torch.device | str = "cpu", value_dtype: torch.dtype | None = None,
               index_dtype: torch.dtype | None = None) -> FlatDelta:
        device = torch.device(device)
        counts = torch.tensor([k for _, k in self.layout], dtype=torch.int64).to(device, non_blocking=True)
        gaps, jumps = (t.to(device, non_blocking=True) for t in (self.gaps, self.jumps))
        vals = self.values.to(device, value_dtype or self.values.dtype, non_blocking=True)
        if vals.data_ptr() == self.values.data_ptr():  # still a view of the file's bytes: not kept alive whole
            vals = vals.clone()
        return FlatDelta(expand_indices(gaps, jumps, counts, index_dtype or self.index_dtype), vals, self.layout)


def decode(data: bytes | bytearray, index_dtype: torch.dtype | None = torch.int64,
           expand: bool = True) -> Delta | EncodedDelta:
    """`index_dtype=None`: indices in the width they were written (int32 below 2^31). Formats 3
    and 2 give a FlatDelta; format 1 a plain dict; `expand=False` leaves a format-3 file's indices
    encoded (an EncodedDelta: what a serving cache reads, to expand them on its device). From a
    writable buffer (`read_hashed`) the stored tensors are views of it, not copies (format 3's
    expanded indices are computed)."""
    header = _header(data)
    meta = header.get("__metadata__") or {}
    tensors = _views(data, header) if isinstance(data, bytearray) else st_load(data)
    if meta.get("tkllm_delta_format") == "3":
        try:
            enc = EncodedDelta(tensors["gaps"], tensors["jumps"], tensors["values"],
                               [(n, int(k)) for n, k in json.loads(meta["layout"])],
                               {"int32": torch.int32, "int64": torch.int64}[meta["index_dtype"]])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed format-3 delta ({e})") from None
        return enc.expand(index_dtype=index_dtype) if expand else enc
    if meta.get("tkllm_delta_format") == "2":
        idx = tensors["indices"] if index_dtype is None else tensors["indices"].to(index_dtype)
        layout = [(n, int(k)) for n, k in json.loads(meta["layout"])]
        if sum(k for _, k in layout) != idx.numel() or idx.numel() != tensors["values"].numel():
            raise ValueError("delta layout does not match its tensors")
        return FlatDelta(idx, tensors["values"], layout)
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {n: (tensors[f"{n}.indices"] if index_dtype is None else tensors[f"{n}.indices"].to(index_dtype),
                tensors[f"{n}.values"]) for n in names}


_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
           "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
           "F64": torch.float64}


def _views(data: bytearray, header: dict) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (`header`: its parsed header) as views of its buffer: each
    checked to lie inside the data and to fill its byte range exactly, as safetensors' own loader
    checks."""
    start, out = 8 + int.from_bytes(data[:8], "little"), {}
    try:
        entries = [(name, _DTYPES.get(t["dtype"]), list(t["shape"]), *t["data_offsets"], t["dtype"])
                   for name, t in header.items() if name != "__metadata__"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed safetensors header ({e})") from None
    for name, dtype, shape, b, e, kind in entries:
        if dtype is None:
            return st_load(bytes(data))  # a dtype this reader does not map: safetensors decodes it
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= b <= e <= len(data) - start or e - b != numel * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: its bytes [{b}, {e}) do not hold {shape} of {kind}")
        flat = torch.frombuffer(data, dtype=dtype, count=numel, offset=start + b) if numel else \
            torch.empty(0, dtype=dtype)
        out[name] = flat.view(shape)
    return out


def _header(data: bytes | bytearray) -> dict:
    """The safetensors header (8-byte little-endian size, then a JSON object)."""
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except ValueError as e:
        raise ValueError(f"malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError("malformed safetensors header (not a JSON object)")
    return header


def save_delta(store: str, account_id: str, delta: Delta, base_model: str, base_fingerprint: str,
               method: str, density: float, value_dtype: str = "bf16", metrics: dict | None = None,
               data_watermark: str | None = None, parent_version: str | None = None,
               extra_files: dict[str, bytes] | None = None, run_id: str | None = None, options=None,
               style: str | None = None, format_version: int = FORMAT_VERSION) -> str:
    """Publish a new version of `account_id`'s delta; returns the version id. `extra_files`
    (reports, plots) go into the same version directory, before it becomes visible. `style` pins
    the account to a style expert's domain when served (serve/experts.py)."""
    blob = encode(delta, value_dtype, format_version)
    fields = {"format_version": format_version, "method": method, "density": density, "value_dtype": value_dtype,
              "entries": sum(int(i.numel()) for i, _ in delta.values()),
              "modules": {n: int(i.numel()) for n, (i, _) in delta.items()}, "style": style}
    return _publish_version(store, account_id, fields, "delta.safetensors", blob, base_model, base_fingerprint,
                            metrics, data_watermark, parent_version, extra_files, run_id, options)


def save_adapters(store: str, account_id: str, blob: bytes, meta: dict, base_model: str, base_fingerprint: str,
                  metrics: dict | None = None, data_watermark: str | None = None, extra_files: dict | None = None,
                  run_id: str | None = None, options=None) -> str:
    """Publish token-selective adapters (train/ts_peft.py: adapter.safetensors + ts_config.json
    `meta`) as a version of the account, beside or instead of sparse deltas: the same manifest,
    LATEST, registry, retraining and serving cache; `artifact` says which it is."""
    # format 2: adapter files did not change with format 3 (a format-2 reader still reads them)
    fields = {"format_version": 2, "artifact": ADAPTERS, "method": meta["method"],
              "trained_as": meta.get("trained_as"), "rank": meta["rank"], "modules": list(meta["modules"])}
    files = {"ts_config.json": json.dumps(meta, indent=1).encode(), **(extra_files or {})}
    return _publish_version(store, account_id, fields, "adapter.safetensors", blob, base_model, base_fingerprint,
                            metrics, data_watermark, None, files, run_id, options)


def _publish_version(store, account_id, fields, name, blob, base_model, base_fingerprint, metrics, data_watermark,
                     parent_version, extra_files, run_id, options) -> str:
    root = join(store, validate_account_id(account_id))
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "account_id": account_id, "artifact": DELTA, "base_model": base_model,
        "base_fingerprint": base_fingerprint, **fields,
        "data_watermark": data_watermark, "metrics": metrics or {}, "run_id": run_id,
        "parent_version": parent_version if parent_version is not None else read_latest(root, options),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: hashlib.sha256(blob).hexdigest()},
    }

    def write(vuri: str) -> None:
        # The manifest first: a version left half-written (a killed worker) is still attributable to
        # its run (see discard_unpublished); readers only ever see versions LATEST points at.
        write_bytes(join(vuri, "manifest.json"), json.dumps(manifest, indent=2).encode(), options)
        write_bytes(join(vuri, name), blob, options)
        for extra, data in (extra_files or {}).items():
            write_bytes(join(vuri, extra), data, options)

    return publish(root, write, options=options)


def load_adapters(store: str, account_id: str, version: str, manifest: dict, base_fingerprint: str | None = None,
                  options=None) -> tuple[dict[str, torch.Tensor], dict]:
    """A published adapters version: (tensors, ts_config), checksum and base checked as load_delta does."""
    root = join(store, validate_account_id(account_id))
    blob = read_bytes(join(root, version, "adapter.safetensors"), options)
    if hashlib.sha256(blob).hexdigest() != manifest["files"]["adapter.safetensors"]:
        raise TkllmError(f"adapters {account_id}/{version} are corrupt (sha256 mismatch): republish them")
    _check_base(account_id, version, manifest, base_fingerprint)
    meta = json.loads(read_bytes(join(root, version, "ts_config.json"), options))
    return st_load(blob), meta


def _check_base(account_id: str, version: str, manifest: dict, base_fingerprint: str | None) -> None:
    if base_fingerprint is not None and manifest["base_fingerprint"] != base_fingerprint:
        raise TkllmError(
            f"delta {account_id}/{version} was trained on base {manifest['base_model']} "
            f"({manifest['base_fingerprint'][:19]}…), not the loaded base ({base_fingerprint[:19]}…): "
            "load the matching base or retrain the account"
        )


def read_version(store: str, account_id: str, version: str | None = None, options=None) -> tuple[str, dict]:
    """A published version (default: the one LATEST names) and its manifest, whose format this
    reader knows: what a reader of either artifact looks at first."""
    root = join(store, validate_account_id(account_id))
    version = version or read_latest(root, options)
    if version is None:
        raise TkllmError(f"no delta published for account {account_id!r} under {store}")
    manifest = read_manifest(store, account_id, version, options)
    if int(manifest.get("format_version", 1)) > FORMAT_VERSION:
        raise TkllmError(f"delta {account_id}/{version} is format {manifest['format_version']}; this reader knows "
                         f"up to {FORMAT_VERSION}: upgrade the reader (deploy readers before writers)")
    return version, manifest


def load_delta(store: str, account_id: str, version: str | None = None, base_fingerprint: str | None = None,
               options=None, index_dtype: torch.dtype | None = torch.int64,
               manifest: dict | None = None, expand: bool = True) -> tuple[Delta | EncodedDelta, dict]:
    """Load a published delta; refuse a corrupt file or one trained on another base. The returned
    manifest carries the resolved `version`; a caller that already read it (`read_version`) passes
    it with its version. The checksum is computed while the file is read (`read_hashed`) and
    checked before the tensors are decoded, as views of the checked bytes."""
    root = join(store, validate_account_id(account_id))
    if manifest is None:
        version, manifest = read_version(store, account_id, version, options)
    if manifest.get("artifact") == ADAPTERS:
        raise TkllmError(f"{account_id}/{version} holds {manifest['method']} adapters, not a sparse delta "
                         "(load_adapters / ts_artifacts.load_ts read it)")
    blob, digest = read_hashed(join(root, version, "delta.safetensors"), options)
    if digest != manifest["files"]["delta.safetensors"]:
        raise TkllmError(f"delta {account_id}/{version} is corrupt (sha256 mismatch): republish it")
    delta = decode(blob, index_dtype, expand)  # views of the checked bytes
    _check_base(account_id, version, manifest, base_fingerprint)
    return delta, {**manifest, "version": version}


def read_manifest(store: str, account_id: str, version: str, options=None) -> dict:
    return json.loads(read_bytes(join(store, validate_account_id(account_id), version, "manifest.json"), options))


def discard_unpublished(store: str, account_id: str, run_id: str, options=None) -> list[str]:
    """Remove version directories this run wrote for the account but never pointed LATEST at (a
    worker killed mid-publish): invisible to readers already, and now gone. Returns them."""
    root = join(store, validate_account_id(account_id))
    latest = read_latest(root, options)
    gone = []
    for name in list_dirs(root, options):
        if name == latest or not exists(join(root, name, "manifest.json"), options):
            continue
        if read_manifest(store, account_id, name, options).get("run_id") == run_id:  # written first: attributable
            remove(join(root, name), options)
            gone.append(name)
    return gone


def published_by(store: str, account_id: str, run_id: str, options=None) -> bool:
    """Whether the account's latest delta was published by run `run_id` (a restarted packed run
    skips those: each account ends with exactly one delta from the run)."""
    version = read_latest(join(store, validate_account_id(account_id)), options)
    return version is not None and read_manifest(store, account_id, version, options).get("run_id") == run_id


def published_accounts(store: str, options=None, threads: int = 8) -> list[tuple[str, str]]:
    """(account, LATEST version) of every account with a published delta, the most recently
    published first (version ids sort by time; see storage.publish.new_version_id). Names that
    are not account ids, and accounts whose LATEST is gone (unpublished), are left out."""
    names = [n for n in list_dirs(store, options) if is_valid_account_id(n)]
    with ThreadPoolExecutor(threads) as pool:  # one small read each: on S3 a round trip, so several at once
        latest = list(pool.map(lambda n: read_latest(join(store, n), options), names))
    return sorted(((n, v) for n, v in zip(names, latest) if v is not None), key=lambda nv: nv[1], reverse=True)
