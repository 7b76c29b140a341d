"""The serving replica's Prometheus metrics, through Ray Serve (exported by every Ray node's
metrics agent)."""

from __future__ import annotations


class ServeMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("tkllm_requests", "generation requests served")
        self.tokens = Counter("tkllm_generated_tokens", "tokens generated")
        self.batch_size = Histogram("tkllm_batch_size", "requests decoding together, per engine step",
                                    boundaries=[1, 2, 4, 8, 16, 32, 64, 128])
        self.tokens_per_s = Gauge("tkllm_tokens_per_s", "tokens/s of the last engine step")
        self.cache_stats = {k: Gauge(f"tkllm_delta_cache_{k}", f"delta cache: {k} so far")
                            for k in ("hits", "host_hits", "misses", "evictions", "store_loads", "swaps", "load_errors",
                                      "prefetched", "prefetch_errors", "unpublished")}
        self.host_mb = Gauge("tkllm_delta_host_mb", "deltas held in host memory (pinned on a GPU), MB")
        self.load_ms = Gauge("tkllm_delta_load_ms", "delta load time (store to device) of the last load, ms")
        self.read_ms = Gauge("tkllm_delta_read_ms", "of the last load, the store's part (manifest, file, hash), ms")

    def step(self, rows: int, finished: int, seconds: float) -> None:
        """One engine step: `rows` requests each got a token, `finished` of them completed."""
        if finished:  # Ray's counters refuse an increment of 0
            self.requests.inc(finished)
        if rows:
            self.tokens.inc(rows)
            self.batch_size.observe(rows)
            self.tokens_per_s.set(rows / max(seconds, 1e-9))

    def cache(self, stats: dict, host_bytes: int = 0) -> None:
        for k, g in self.cache_stats.items():
            g.set(stats[k])
        self.host_mb.set(host_bytes / 2**20)
        if stats["load_ms"]:
            self.load_ms.set(stats["load_ms"][-1])
        if stats.get("read_ms"):
            self.read_ms.set(stats["read_ms"][-1])
