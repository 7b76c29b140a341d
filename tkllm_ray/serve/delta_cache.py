"""A serving replica's account deltas, in tiers: the device (hot), host memory (pinned when there
is a GPU), and the delta store (local or s3://). Each tier is LRU under a byte budget; a delta
evicted from the device stays in host memory until host memory needs the room.

Loads from the store run on a thread pool: `aget` never blocks the event loop that serves other
accounts, and concurrent requests for the same account share one load. A newer published
version (the store's LATEST) is picked up by `refresh()` without a restart: it loads in the
background while the old version keeps serving, then replaces it in one step.

On the device a delta is what the serving op reads: per module, int32 row-major indices and
values in the base's dtype (3.9M entries of tkllm-s at 0.3%: ~23 MB in bf16). In every tier the
modules are views into two flat buffers (all indices, all values), so moving a delta between
tiers is two copies, and pinning it two page-locked allocations, not two per module.

A format-3 file (sparse/delta_store.py: 16-bit gaps for the indices) is read as stored, 4 bytes
an entry, copied to the device that way, and its indices expanded there (a running sum); with a
GPU the host tier's copy is then made from the device's, in the background.

`prefetch` fills the host tier ahead of requests (a replica starts it with the store's most
recently published accounts), so a device miss for a recently active account is a copy from
host memory (~1 ms) and not a store read (~30 ms, and exposed to the store's stalls).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tkllm_ray.data.schema import is_valid_account_id, validate_account_id
from tkllm_ray.errors import TkllmError
from tkllm_ray.sparse.delta_op import check_sorted
from tkllm_ray.serve.adapters import Adapters
from tkllm_ray.sparse.delta_store import (ADAPTERS, Delta, EncodedDelta, FlatDelta, load_adapters, load_delta,
                                          published_accounts, read_version)
from tkllm_ray.storage import join, read_latest


class UnknownAccount(TkllmError):
    """No delta is published for the account (a request for it is a 404)."""


class DeltaLoadError(TkllmError):
    """The account's delta is corrupt or belongs to another base: that account fails, others serve."""


@dataclass
class CachedDelta:
    account: str
    version: str
    manifest: dict
    flat: tuple[torch.Tensor, torch.Tensor]  # every module's indices, every module's values
    layout: list[tuple[str, int]]  # (module, entries) in `flat` order
    # A token-selective account (manifest artifact "ts-adapters") has no delta but adapters:
    # serve.adapters.Adapters (kind, scale, module -> lora_A, lora_B, tau[, magnitude]), as trained.
    adapters: Adapters | None = None
    _modules: FlatDelta | None = field(default=None, repr=False, compare=False)

    @property
    def delta(self) -> FlatDelta:
        """module -> (int32 sorted flat indices, values): views into `flat`, made on first use. A
        delta that only sits in host memory never makes them: they are Python objects, several a
        module, that every full garbage collection walks (1,000 accounts' views add ~90 ms to each
        full collection on 2 cores, a pause for every request in flight: benchmarks/gc_pauses.py)."""
        if self._modules is None:
            self._modules = FlatDelta(*self.flat, self.layout)
        return self._modules

    @classmethod
    def of(cls, account: str, version: str, delta: Delta, manifest: dict, dtype: torch.dtype,
           adapters=None) -> "CachedDelta":
        if isinstance(delta, FlatDelta):  # decoded from a format-2 or -3 file: already flat
            (idx, vals), layout = delta.flat, delta.layout
            return cls._views(account, version, manifest, idx.to(torch.int32), vals.to(dtype), layout, adapters)
        layout = [(n, i.numel()) for n, (i, _) in delta.items()]
        idx = torch.cat([i.to(torch.int32) for i, _ in delta.values()]) if delta else torch.empty(0, dtype=torch.int32)
        vals = torch.cat([v.to(dtype) for _, v in delta.values()]) if delta else torch.empty(0, dtype=dtype)
        return cls._views(account, version, manifest, idx, vals, layout, adapters)

    @classmethod
    def _views(cls, account, version, manifest, idx, vals, layout, adapters=None) -> "CachedDelta":
        # the flat buffers, which a reader that wants them whole (the slot pool) takes as they are
        return cls(account, version, manifest, (idx, vals), layout, adapters)

    def narrowed(self) -> "CachedDelta":
        """The same delta with int32 indices (what the serving op reads), once they are checked."""
        return self._views(self.account, self.version, self.manifest, self.flat[0].to(torch.int32), self.flat[1],
                           self.layout, self.adapters)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat) + (self.adapters.nbytes if self.adapters else 0)

    def to(self, device: torch.device, pin: bool = False) -> "CachedDelta":
        if pin and device.type == "cpu":
            idx, vals = (_pinned(t) for t in self.flat)
        else:
            idx, vals = (t.to(device, non_blocking=True) for t in self.flat)
        adapters = self.adapters.to(device, pin) if self.adapters else None
        return self._views(self.account, self.version, self.manifest, idx, vals, self.layout, adapters)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.pin_memory()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


@dataclass
class _Encoded:
    """A format-3 delta as read from the store: its indices expand where it lands."""
    account: str
    version: str
    manifest: dict
    delta: EncodedDelta

    def expand(self, device: torch.device, dtype: torch.dtype) -> CachedDelta:
        flat = self.delta.expand(device, dtype, torch.int64)
        return CachedDelta._views(self.account, self.version, self.manifest, *flat.flat, flat.layout)


class _Tier:
    def __init__(self, budget: int):
        self.budget, self.used, self.items = budget, 0, OrderedDict()

    def get(self, account: str) -> CachedDelta | None:
        item = self.items.get(account)
        if item is not None:
            self.items.move_to_end(account)
        return item

    def put(self, item: CachedDelta) -> list[str]:
        """Insert (replacing an older version); evict least recently used to fit. Returns evicted."""
        self.drop(item.account)
        if item.nbytes > self.budget:
            return []  # larger than the whole tier: served without caching
        evicted = []
        while self.used + item.nbytes > self.budget and self.items:
            account, old = self.items.popitem(last=False)
            self.used -= old.nbytes
            evicted.append(account)
        self.items[item.account] = item
        self.used += item.nbytes
        return evicted

    def drop(self, account: str) -> None:
        old = self.items.pop(account, None)
        if old is not None:
            self.used -= old.nbytes


class DeltaCache:
    def __init__(self, store: str, device: torch.device | str = "cpu", device_budget: int = 1 << 30,
                 host_budget: int = 4 << 30, base_fingerprint: str | None = None, dtype: torch.dtype = torch.float32,
                 options=None, loader_threads: int = 2, shapes: dict[str, int] | None = None,
                 prefetch_threads: int = 4):
        """`shapes` (module -> weight numel of the served base): each loaded delta is checked
        against it (known modules, indices in range), besides sorted and unique, before any
        kernel reads it. `prefetch_threads`: deltas a prefetch reads and prepares at once."""
        self.store, self.options, self.base_fingerprint, self.shapes = store, options, base_fingerprint, shapes
        self.device, self.dtype = torch.device(device), dtype
        self.hot, self.host = _Tier(device_budget), _Tier(host_budget)
        self.pin = self.device.type == "cuda"
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str | None], Future] = {}
        self._pool = ThreadPoolExecutor(loader_threads, thread_name_prefix="delta-load")
        # its own threads: requests' loads never queue behind a prefetch (one thread takes the
        # prepared copies in order; the others read and prepare them, several at once)
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="delta-prefetch")
        self._copier = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="delta-prefetch-read")
        self._window = 2 * prefetch_threads
        self._closed = False
        self._served: dict[str, str] = {}  # account -> the version loaded last (what a host copy may hold)
        self.stats = {"hits": 0, "host_hits": 0, "misses": 0, "evictions": 0, "store_loads": 0, "swaps": 0,
                      "load_errors": 0, "prefetched": 0, "prefetch_errors": 0, "unpublished": 0,
                      "load_ms": deque(maxlen=1024),  # the recent loads' times
                      "read_ms": deque(maxlen=1024)}  # of which the store's part (manifest, file, hash, decode)

    # -- lookups ----------------------------------------------------------------------------------
    def get(self, account: str) -> CachedDelta:
        """The account's delta on the device (blocking on a store load if it is in no tier). An id
        that could not name a path or key is refused before any lookup."""
        validate_account_id(account)
        with self._lock:
            item = self._lookup(account)
        return item if item is not None else self._load(account).result()

    async def aget(self, account: str) -> CachedDelta:
        """As `get`, but a store load runs on the loader threads while the event loop serves others."""
        validate_account_id(account)
        with self._lock:
            item = self._lookup(account)
        return item if item is not None else await asyncio.wrap_future(self._load(account))

    def _lookup(self, account: str) -> CachedDelta | None:
        item = self.hot.get(account)
        if item is not None:
            self.stats["hits"] += 1
            return item
        item = self.host.get(account)
        if item is None:
            return None
        self.stats["host_hits"] += 1
        return self._promote(item.to(self.device))

    def _promote(self, item: CachedDelta) -> CachedDelta:
        self.stats["evictions"] += len(self.hot.put(item))
        return item

    # -- loading ------------------------------------------------------------------------------------
    def _load(self, account: str, version: str | None = None) -> Future:
        key = (account, version)
        with self._lock:
            fut = self._loading.get(key)
            if fut is None:
                if version is None:
                    self.stats["misses"] += 1
                fut = self._loading[key] = self._pool.submit(self._load_now, account, version)
        return fut

    def _load_now(self, account: str, version: str | None) -> CachedDelta:
        t0 = time.perf_counter()
        try:
            try:
                host = self._read(account, version)
                read_ms = (time.perf_counter() - t0) * 1e3
                hot = self._placed(host, self.device)
                if isinstance(host, _Encoded):
                    host = None if self.pin else hot  # a GPU's host copy: made from `hot`, pinned
            except TkllmError as e:
                if "no delta published" in str(e):
                    raise UnknownAccount(f"unknown account {account!r}: no delta is published for it") from None
                self._count("load_errors")
                raise DeltaLoadError(f"account {account!r}: {e}") from None
            except (OSError, ValueError, KeyError, IndexError, RuntimeError) as e:  # unreadable manifest or tensors
                self._count("load_errors")
                raise DeltaLoadError(f"account {account!r}: its delta cannot be read ({e})") from None
            if self.device.type == "cuda":
                torch.cuda.current_stream().synchronize()  # ready before any request reads it
            with self._lock:
                self.stats["store_loads"] += 1
                self.stats["load_ms"].append((time.perf_counter() - t0) * 1e3)
                self.stats["read_ms"].append(read_ms)
                self._served[account] = hot.version
                if host is not None:
                    self.host.put(host)
                else:  # an older version's host copy must not outlive this one: its own copy follows
                    self.host.drop(account)
                kept = host is not None and self.host.items.get(account) is host  # not when larger than the tier
                self._promote(hot)
            # the host copy is pinned after the request has its delta (fast promotions later); a copy
            # the host tier did not keep is not (pinning it only slowed the next load beside it)
            if self.pin and kept:
                self._pool.submit(self._pin, host)
            elif self.pin and host is None and hot.nbytes <= self.host.budget:
                self._pool.submit(self._pin_from_device, hot)
            return hot
        finally:
            with self._lock:
                self._loading.pop((account, version), None)

    def _placed(self, item: "CachedDelta | _Encoded", device: torch.device) -> CachedDelta:
        """A delta as `_read` gives it, on `device` with its entries checked there: format 3's 4
        bytes an entry copied and the indices expanded there (int64 until checked, then int32), other
        formats copied (from pageable memory: pinning first would cost more than it saves). On a GPU
        the check is one pass over the flat indices there, and its result is read back, so the copy
        is done before any request reads the delta."""
        if not isinstance(item, _Encoded):
            placed = item.to(device)
            self._check_entries(placed)
            return placed
        placed = item.expand(device, self.dtype)
        self._check_entries(placed)
        return placed.narrowed()

    def _read(self, account: str, version: str | None) -> "CachedDelta | _Encoded":
        """The version from the store, checked: a sparse delta (format 3: its indices still encoded),
        or token-selective adapters."""
        version, manifest = read_version(self.store, account, version, self.options)
        if manifest.get("artifact") == ADAPTERS:
            tensors, meta = load_adapters(self.store, account, version, manifest, self.base_fingerprint, self.options)
            adapters = Adapters.of(tensors, meta)
            if self.shapes is not None:
                adapters.check(self.shapes)
            return CachedDelta.of(account, version, {}, {**manifest, "version": version}, self.dtype, adapters)
        delta, manifest = load_delta(self.store, account, version, self.base_fingerprint, self.options,
                                     index_dtype=None, manifest=manifest, expand=False)
        if isinstance(delta, EncodedDelta):
            self._check_layout(delta.layout, delta.index_dtype)
            return _Encoded(account, manifest["version"], manifest, delta)
        self._check_modules(delta)
        return CachedDelta.of(account, manifest["version"], delta, manifest, self.dtype)

    def _pin(self, item: CachedDelta) -> None:
        pinned = item.to(torch.device("cpu"), pin=True)
        with self._lock:
            if self.host.items.get(item.account) is item:  # not replaced or evicted meanwhile
                self.host.items[item.account] = pinned

    def _pin_from_device(self, hot: CachedDelta) -> None:
        """The host tier's copy of a delta loaded encoded: its expanded buffers, copied back from
        the device into pinned memory (what a promotion copies from)."""
        pinned = hot.to(torch.device("cpu"), pin=True)
        with self._lock:
            # unless a newer version has loaded since (evicted from the device meanwhile or not: the
            # host tier is where a delta evicted from the device stays)
            if self._served.get(hot.account) == hot.version:
                self.host.put(pinned)

    def _check_known(self, name: str) -> None:
        if self.shapes is not None and name not in self.shapes:
            raise ValueError(f"module {name} is not a target linear of the served base")

    def _check_layout(self, layout: list[tuple[str, int]], index_dtype: torch.dtype) -> None:
        for name, _ in layout:
            self._check_known(name)
        if index_dtype == torch.int64:  # stored wide: a huge module
            raise ValueError("indices past 2^31 (the cache keeps int32 indices)")

    def _check_modules(self, delta: Delta) -> None:
        for name, (idx, vals) in delta.items():
            if idx.numel() != vals.numel():
                raise ValueError(f"module {name}: {idx.numel()} indices but {vals.numel()} values")
            self._check_known(name)
            if idx.dtype == torch.int64 and idx.numel() and int(idx.max()) >= 2**31:  # stored wide: a huge module
                raise ValueError(f"module {name}: indices past 2^31 (the cache keeps int32 indices)")

    def _check_entries(self, item: CachedDelta) -> None:
        """Every module's indices sorted, unique and inside its weights: one pass over the flat
        indices (a check per module cost more than the load), naming the first module that fails."""
        flat = item.flat[0]
        spans = [(n, k) for n, k in item.layout if k]
        if not spans:
            return
        counts = torch.tensor([k for _, k in spans], device=flat.device)
        starts = counts.cumsum(0) - counts
        nonempty = torch.cat([item.delta[n][0] for n, _ in spans]) if len(spans) < len(item.layout) else flat
        rising = nonempty[1:] > nonempty[:-1]
        rising[starts[1:] - 1] = True  # a module's first entry need not exceed the previous module's last
        if not bool(rising.all()):
            bad = spans[int(torch.searchsorted(starts, (~rising).nonzero()[0, 0] + 1, right=True)) - 1][0]
            check_sorted(item.delta[bad][0], f"module {bad}'s indices")
        # without the base's shapes: inside int32 (what the cache narrows the indices to)
        sizes = [self.shapes[n] if self.shapes is not None else 2**31 for n, _ in spans]
        out = (nonempty[starts] < 0) | (nonempty[starts + counts - 1] >= torch.tensor(sizes, device=flat.device))
        if bool(out.any()):
            i = int(out.nonzero()[0, 0])
            raise ValueError(f"module {spans[i][0]}: an index is outside its {sizes[i]} weights")

    # -- warming the host tier -------------------------------------------------------------------------
    def prefetch(self, accounts: Iterable[str] | None = None) -> Future:
        """Read deltas into the host tier in the background (pinned with a GPU), in the order given
        (default: every account in the store, the most recently published first), until the host
        tier is full; nothing already there is evicted for them. Accounts in a tier or loading are
        skipped; one that fails to load is counted (`prefetch_errors`) and skipped (its requests
        get the error). Indices are expanded and checked on the CPU: no device time is taken from
        serving. The future's result: the accounts it added."""
        return self._prefetcher.submit(self._prefetch_now, accounts)

    def _prefetch_now(self, accounts: Iterable[str] | None) -> list[str]:
        if accounts is None:
            accounts = [a for a, _ in published_accounts(self.store, self.options)]
        todo, window, added = iter(accounts), deque(), []

        def fill():  # keep the copier threads busy with the next accounts, in order
            while len(window) < self._window and not self._closed:
                account = next(todo, None)
                if account is None:
                    return
                with self._lock:
                    if not is_valid_account_id(account) or self._held(account):
                        continue
                window.append((account, self._copier.submit(self._host_copy, account)))

        fill()
        while window:
            account, fut = window.popleft()
            try:
                item = fut.result()
            except (TkllmError, OSError, ValueError, KeyError, IndexError, RuntimeError):
                self._count("prefetch_errors")
                fill()
                continue
            with self._lock:
                if self.host.used + item.nbytes > self.host.budget:  # full: the accounts asked for first are in
                    for _, later in window:
                        later.cancel()
                    break
                if not (self._held(account) or self._served.get(account, item.version) != item.version):
                    self.host.put(item)  # (unless a request loaded it meanwhile, or a newer version)
                    self._served[account] = item.version
                    self.stats["prefetched"] += 1
                    added.append(account)
            fill()
        return added

    def _in_tiers(self, account: str) -> bool:
        return account in self.hot.items or account in self.host.items

    def _held(self, account: str) -> bool:
        return self._in_tiers(account) or any(a == account for a, _ in self._loading)

    def _host_copy(self, account: str) -> CachedDelta:
        """The account's latest delta as the host tier keeps it: indices expanded and checked on
        the CPU, narrowed, pinned with a GPU."""
        item = self._placed(self._read(account, None), torch.device("cpu"))
        return item.to(torch.device("cpu"), pin=True) if self.pin else item

    def drop(self, account: str) -> bool:
        """Unload the account from this cache's tiers (requests already holding its delta finish
        with it; its next request loads from the store). Returns whether any tier held it."""
        validate_account_id(account)
        with self._lock:
            held = self._in_tiers(account)
            self.hot.drop(account)
            self.host.drop(account)
            self._served.pop(account, None)
        return held

    # -- new versions -------------------------------------------------------------------------------
    def refresh(self, accounts: Iterable[str] | None = None) -> list[Future]:
        """Start loading the newest version of every cached account (or of `accounts` among them)
        whose LATEST moved on; the version in the cache keeps serving until its successor has
        loaded (then one swap). An account whose LATEST is gone (unpublished) is dropped."""
        with self._lock:
            cached = {a: item.version for tier in (self.hot, self.host) for a, item in tier.items.items()}
        if accounts is not None:
            wanted = {validate_account_id(a) for a in accounts}
            cached = {a: v for a, v in cached.items() if a in wanted}
        started = []
        for account, version in cached.items():
            latest = read_latest(join(self.store, account), self.options)
            if latest is None:
                if self.drop(account):
                    self._count("unpublished")
            elif latest != version:
                fut = self._load(account, latest)
                fut.add_done_callback(lambda f: f.exception() is None and self._count("swaps"))
                started.append(fut)
        return started

    def _count(self, stat: str) -> None:
        with self._lock:
            self.stats[stat] += 1

    def close(self) -> None:
        self._closed = True  # a prefetch stops at its next account
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self._copier.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True)
