"""The Ray Serve application: an OpenAI-style HTTP ingress over a model deployment that holds the
base once per replica and batches the requests of different accounts together.

Routing uses Serve's model multiplexing (the account id is the multiplexed model id), so a request
goes to a replica that already holds its account's delta. Serve's own @serve.batch splits batches
by multiplexed id (one account per batch), so the replica batches itself, continuously: requests
of any accounts join the running batch (up to `max_batch` at once) at the engine's next step and
leave it when done; nobody waits for the longest request of a batch. With style experts
(serve/experts.py) a request's delta is its account's plus its routed or pinned experts'.
"""

# No `from __future__ import annotations` here: FastAPI reads the body models from the methods' real
# annotations (as strings, in Serve's class-based view, it took `body` for a query parameter).
import asyncio
import gc
import json
import time
import uuid
from collections import OrderedDict

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from tkllm_ray.errors import TkllmError
from tkllm_ray.serve.api import AdminBody, ApiError, ChatBody, CompletionBody, KeyRing, parse_model
from tkllm_ray.serve.delta_cache import DeltaCache, DeltaLoadError, UnknownAccount
from tkllm_ray.serve.engine import DeltaBatchEngine, GenRequest
from tkllm_ray.serve.experts import combine, load_experts
from tkllm_ray.serve.metrics import ServeMetrics


@serve.deployment
class DeltaModel:
    def __init__(self, model: str, tokenizer: str, deltas: str, device: str = "cpu", device_cache_mb: int = 1024,
                 host_cache_mb: int = 4096, max_batch: int = 16, batch_wait_ms: float = 5.0, refresh_s: float = 5.0,
                 storage=None, max_seq_len: int | None = None, experts: str | None = None,
                 compile_decode: bool = False, dtype: str = "auto", layout_cache_mb: int = 2048,
                 host_prefetch: bool = True, prefill_graph_tokens: int = 4096):
        from tkllm_ray.data.tokenizer import load_tokenizer
        from tkllm_ray.models import fingerprint
        from tkllm_ray.models.load import load_base_model, resolve_dtype
        from tkllm_ray.sparse.sensitivity import target_linears

        self.tok = load_tokenizer(tokenizer, storage)
        base = load_base_model(model, len(self.tok), device=device, options=storage, tokenizer_name=tokenizer,
                               dtype=resolve_dtype(dtype, device))
        shapes = {n: m.weight.numel() for n, m in target_linears(base).items()}
        fp = fingerprint(base)
        self.cache = DeltaCache(deltas, device, device_cache_mb << 20, host_cache_mb << 20, fp,
                                next(base.parameters()).dtype, storage, shapes=shapes)
        if host_prefetch:  # the store's most recent accounts into host memory, in the background
            self.cache.prefetch().add_done_callback(
                lambda f: f.exception() is not None and print(f"host prefetch failed: {f.exception()}"))
        self.engine = DeltaBatchEngine(base, pad_id=self.tok.pad_token_id or 0, slots=max_batch, max_len=max_seq_len,
                                       compile=compile_decode and str(device).startswith("cuda"),
                                       layout_cache_mb=layout_cache_mb, freeze_gc=True,
                                       prefill_graph_tokens=prefill_graph_tokens)
        self.experts = load_experts(experts, fp, device, next(base.parameters()).dtype, storage) \
            if experts else None
        self.embed = base.get_input_embeddings()
        self.combined: OrderedDict = OrderedDict()  # (account, version, expert weights) -> delta, LRU
        self.max_batch, self.wait_s, self.refresh_s = max_batch, batch_wait_ms / 1e3, refresh_s
        self.queue: asyncio.Queue | None = None
        self.metrics = ServeMetrics()
        # What exists now (the base, the engine, the libraries) lives as long as the replica: out of
        # the garbage collector's walks, a full collection no longer pauses every request in flight
        # (the replica's imports alone: 110-130 ms a collection on 2 cores; benchmarks/gc_pauses.py)
        gc.freeze()

    @serve.multiplexed(max_num_models_per_replica=256)
    async def account_version(self, account: str) -> str:
        """Loads the account's delta into this replica's cache; what Serve's router records, so
        later requests for the account come here."""
        return (await self.cache.aget(account)).version

    async def generate(self, req: dict) -> dict:
        """{prompt, account, max_tokens, temperature, top_p, seed, stop} -> {text, finish_reason,
        usage counts} or {error: {status, message, type}} for this request alone."""
        job = await self._submit(req)
        if "error" in job:
            return job
        while True:
            item = await job["sink"].get()
            if "error" in item:
                return item
            if item["finished"]:
                text, reason = self._final_text(job, item["tokens"])
                return {"text": text, "prompt_tokens": len(job["gen"].prompt),
                        "completion_tokens": len(item["tokens"]), "finish_reason": reason}

    async def generate_stream(self, req: dict):
        """As `generate`, as it happens: {"text": new text} chunks, then {"finish_reason", usage}.
        Text that could still turn into the start of a stop string is held back until it cannot."""
        job = await self._submit(req)
        if "error" in job:
            yield job
            return
        hold = max((len(s) for s in req["stop"]), default=1) - 1
        sent = 0
        while True:
            item = await job["sink"].get()
            if "error" in item:
                yield item
                return
            finished = item["finished"]
            if finished:
                text, reason = self._final_text(job, item["tokens"])
            else:
                text = self.tok.decode(item["tokens"], skip_special_tokens=True).rstrip("\ufffd")  # no half chars
                text, cut = _cut_at_stop(text, req["stop"])
                if cut:  # a stop string spelled by other tokens than its own: end here (the batch runs on)
                    finished, reason = True, "stop"
                else:
                    text = text[: max(sent, len(text) - hold)]
            if len(text) > sent:
                yield {"text": text[sent:]}
                sent = len(text)
            if finished:
                yield {"finish_reason": reason, "prompt_tokens": len(job["gen"].prompt),
                       "completion_tokens": len(item["tokens"])}
                return

    async def admin(self, op: str, accounts: list[str] | None) -> dict:
        """This replica's cache, by an admin: "prefetch" into host memory (default: the store's
        most recently published accounts, until the host tier is full); "reload" the newest
        published versions now (a publish notification; default: every cached account); "unload"
        accounts from every tier. Other replicas reload and drop unpublished accounts at their
        next version check (refresh_s)."""
        if op == "prefetch":
            added = await asyncio.wrap_future(self.cache.prefetch(accounts))
            return {"prefetched": added, "host_cache_mb": round(self.cache.host.used / 2**20, 3)}
        if op == "reload":
            futures = await asyncio.to_thread(self.cache.refresh, accounts)
            done = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
            return {"reloaded": {d.account: d.version for d in done if not isinstance(d, BaseException)},
                    "errors": [str(d) for d in done if isinstance(d, BaseException)]}
        gone = set(accounts or [])
        unloaded = [a for a in accounts or [] if self.cache.drop(a)]
        for key in [k for k in self.combined if k[0] in gone]:  # with their experts
            del self.combined[key]
        return {"unloaded": unloaded}

    async def _submit(self, req: dict) -> dict:
        try:
            if req["account"] is not None:
                await self.account_version(req["account"])  # routing record; loads the delta here
        except (UnknownAccount, DeltaLoadError) as e:
            return _delta_error(e)
        if self.queue is None:  # the replica's loop runs now: start its batcher and version check
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batcher())
            asyncio.get_running_loop().create_task(self._refresher())
        if req.get("style") is not None:
            try:
                if self.experts is None:
                    raise TkllmError("this endpoint serves no style experts")
                self.experts.check_style(req["style"])
            except TkllmError as e:
                return {"error": {"status": 400, "message": f"style: {e}", "type": "invalid_request_error"}}
        ids = self.tok(req["prompt"], add_special_tokens=False)["input_ids"]
        stops = [self.tok(s, add_special_tokens=False)["input_ids"] for s in req["stop"]]
        job = {"req": req, "sink": asyncio.Queue(), "gen": GenRequest(
            ids, None, req["max_tokens"], req["temperature"], req["top_p"], req["seed"], stops, self.tok.eos_token_id)}
        await self.queue.put(job)
        return job

    def _final_text(self, job: dict, tokens: list[int]) -> tuple[str, str]:
        text, cut = _cut_at_stop(self.tok.decode(tokens, skip_special_tokens=True), job["req"]["stop"])
        return text, "stop" if cut or len(tokens) < job["gen"].max_tokens else "length"

    async def _batcher(self) -> None:
        """Continuous batching: between engine steps, queued requests join (their deltas fetched
        first); an idle replica waits up to batch_wait_ms to prefill arrivals together."""
        jobs: dict[int, dict] = {}
        while True:
            pending = []
            if not self.engine.busy:
                pending.append(await self.queue.get())
                deadline = time.monotonic() + self.wait_s
                while (left := deadline - time.monotonic()) > 0:
                    try:
                        pending.append(await asyncio.wait_for(self.queue.get(), left))
                    except asyncio.TimeoutError:
                        break
            while not self.queue.empty():
                pending.append(self.queue.get_nowait())
            for job in pending:
                await self._join(job, jobs)
            if not self.engine.busy:
                continue
            t0 = time.perf_counter()
            try:
                updates = await asyncio.to_thread(self.engine.step)  # the event loop keeps taking requests
            except Exception as e:  # never leave a caller waiting
                self.engine.abort()
                for job in jobs.values():
                    job["sink"].put_nowait({"error": {"status": 500, "message": f"generation failed: {e}",
                                                      "type": "server_error"}})
                jobs.clear()
                continue
            for rid, toks, finished in updates:
                jobs[rid]["sink"].put_nowait({"tokens": toks, "finished": finished})
                if finished:
                    del jobs[rid]
            self.metrics.step(len(updates), sum(1 for *_, f in updates if f), time.perf_counter() - t0)

    async def _join(self, job: dict, jobs: dict) -> None:
        account = job["req"]["account"]
        try:
            cached = (await self.cache.aget(account)) if account is not None else None
        except (UnknownAccount, DeltaLoadError) as e:  # evicted since _submit, and now failing to reload
            job["sink"].put_nowait(_delta_error(e))
            return
        job["gen"].delta = self._with_experts(cached, job) if self.experts is not None else \
            (cached.delta or None if cached is not None else None)  # a token-selective account: no delta
        job["gen"].adapters = cached.adapters if cached is not None else None
        try:
            jobs[self.engine.submit(job["gen"])] = job
        except ValueError as e:  # longer than the engine's cache
            job["sink"].put_nowait({"error": {"status": 400, "message": str(e), "type": "invalid_request_error"}})

    def _with_experts(self, cached, job: dict):
        """The account's delta plus its style experts: pinned by the request, else by the account's
        manifest, else routed on the prompt. Combined deltas are kept (LRU) per account version
        and weights, so a pinned or top-1 style costs one merge per account."""
        pin = job["req"].get("style") or (cached.manifest.get("style") if cached is not None else None)
        if pin is not None and pin not in self.experts.domains:
            pin = None  # a manifest naming a style this endpoint lacks: route instead
        weights = {d: round(w, 3) for d, w in self.experts.weights(job["gen"].prompt, self.embed, pin).items()}
        key = (cached.account if cached else None, cached.version if cached else None, tuple(sorted(weights.items())))
        if key not in self.combined:
            self.combined[key] = combine(cached.delta if cached else None, self.experts.deltas, weights)
            while len(self.combined) > 64:
                self.combined.popitem(last=False)
        self.combined.move_to_end(key)
        return self.combined[key]

    async def _refresher(self) -> None:
        """Pick up newly published versions: each loads beside the one serving, then replaces it.
        Ends when the replica's event loop is shutting down (its thread pool takes no more work)."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await asyncio.to_thread(self.cache.refresh)
            except Exception as e:
                if isinstance(e, RuntimeError) and "shutdown" in str(e):  # the loop's pool is shut: stopping
                    return
                print(f"delta refresh failed: {e}")  # a store hiccup: keep serving what is loaded, retry later
            self.metrics.cache(self.cache.stats, self.cache.host.used)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string in it (the token-level check can miss one spelled by
    other tokens), and whether one was there."""
    hits = [text.index(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def _delta_error(e: Exception) -> dict:
    status, kind = (404, "model_not_found") if isinstance(e, UnknownAccount) else (500, "delta_error")
    return {"error": {"status": status, "message": str(e), "type": kind}}


def _error(out: dict) -> JSONResponse:
    err = out["error"]
    return JSONResponse(status_code=err["status"], content={"error": {k: err[k] for k in ("message", "type")}})


def _usage(out: dict) -> dict:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


def build_ingress(base_name: str, keys: KeyRing | None):
    app = FastAPI(title="tkllm-ray", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in exc.errors())
        return JSONResponse(status_code=400, content={"error": {"message": detail, "type": "invalid_request_error"}})

    @serve.deployment
    @serve.ingress(app)
    class Ingress:
        def __init__(self, model_handle):
            self.model = model_handle

        async def _complete(self, body, prompt: str, authorization: str | None, chat: bool):
            try:
                account = parse_model(body.model, base_name)
                if keys is not None:
                    keys.check(authorization, account)
            except ApiError as e:
                return JSONResponse(status_code=e.status, content=e.body())
            req = {"prompt": prompt, "account": account, "max_tokens": body.max_tokens,
                   "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": body.stop or [],
                   "style": body.style}
            handle = self.model.options(multiplexed_model_id=account) if account else self.model
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                    "model": body.model}
            if body.stream:
                return await self._stream(handle, req, head, chat)
            out = await handle.generate.remote(req)
            if "error" in out:
                return _error(out)
            choice = {"index": 0, "finish_reason": out["finish_reason"]}
            choice.update({"message": {"role": "assistant", "content": out["text"]}} if chat else {"text": out["text"]})
            return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                    "usage": _usage(out)}

        async def _stream(self, handle, req: dict, head: dict, chat: bool):
            """Server-sent events, OpenAI's chunk format; errors before the first chunk keep their status."""
            chunks = handle.options(stream=True).generate_stream.remote(req)
            first = await chunks.__anext__()
            if "error" in first:
                return _error(first)

            def event(chunk: dict) -> str:
                done = "finish_reason" in chunk
                part = {} if done else ({"delta": {"content": chunk["text"]}} if chat else {"text": chunk["text"]})
                body = {**head, "object": "chat.completion.chunk" if chat else "text_completion",
                        "choices": [{"index": 0, **part, "finish_reason": chunk.get("finish_reason")}]}
                if done:
                    body["usage"] = _usage(chunk)
                return f"data: {json.dumps(body)}\n\n"

            async def events():
                yield event(first)
                async for chunk in chunks:
                    if "error" in chunk:  # mid-stream: the status line has gone; say so in the stream
                        yield f"data: {json.dumps({'error': chunk['error']})}\n\n"
                        return
                    yield event(chunk)
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(self, body: CompletionBody, authorization: str | None = Header(None)):
            return await self._complete(body, body.prompt, authorization, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(self, body: ChatBody, authorization: str | None = Header(None)):
            try:
                prompt = body.prompt()
            except ValueError as e:
                return JSONResponse(status_code=400, content={"error": {"message": str(e),
                                                                        "type": "invalid_request_error"}})
            return await self._complete(body, prompt, authorization, chat=True)

        @app.post("/v1/admin/{op}")
        async def admin(self, op: str, body: AdminBody, authorization: str | None = Header(None)):
            try:
                if keys is not None:
                    keys.check_admin(authorization)
                if op not in ("prefetch", "reload", "unload"):
                    raise ApiError(404, f"no admin operation {op!r}: prefetch, reload or unload", "not_found_error")
                if op == "unload" and not body.accounts:
                    raise ApiError(400, "accounts: unload needs the accounts to unload", "invalid_request_error")
            except ApiError as e:
                return JSONResponse(status_code=e.status, content=e.body())
            return await self.model.admin.remote(op, body.accounts)

        @app.get("/v1/models")
        async def models(self):
            return {"object": "list", "data": [{"id": base_name, "object": "model", "owned_by": "tkllm-ray"}]}

        @app.get("/healthz")
        async def healthz(self):
            return {"ok": True}

    return Ingress


def build_app(model: str, tokenizer: str, deltas: str, base_name: str | None = None, keys: KeyRing | None = None,
              deployment_options: dict | None = None, ingress_options: dict | None = None, **model_kwargs):
    """The application `serve.run` deploys: Ingress -> DeltaModel (`model_kwargs`: DeltaModel's
    device, cache sizes, batching, experts, storage; `deployment_options` / `ingress_options`:
    replicas, autoscaling, resources of each deployment)."""
    base_name = base_name or model.rstrip("/").rsplit("/", 1)[-1]
    replica = DeltaModel.options(**(deployment_options or {})).bind(model, tokenizer, deltas, **model_kwargs)
    return build_ingress(base_name, keys).options(**(ingress_options or {})).bind(replica)


def app_builder(args: dict):
    """What `serve deploy cluster/serve.yaml` imports: the app from a ServeConfig's fields."""
    from tkllm_ray.config.serve import ServeConfig

    cfg = ServeConfig(**args)
    keys = KeyRing.from_file(cfg.keys_file) if cfg.keys_file else None
    return build_app(cfg.model, cfg.tokenizer, cfg.deltas, cfg.base_name, keys, device=cfg.device,
                     device_cache_mb=cfg.device_cache_mb, host_cache_mb=cfg.host_cache_mb, max_batch=cfg.max_batch,
                     max_seq_len=cfg.max_seq_len, experts=cfg.experts, batch_wait_ms=cfg.batch_wait_ms,
                     refresh_s=cfg.refresh_s, storage=cfg.storage, compile_decode=cfg.compile_decode,
                     dtype=cfg.dtype, layout_cache_mb=cfg.layout_cache_mb, host_prefetch=cfg.host_prefetch,
                     prefill_graph_tokens=cfg.prefill_graph_tokens)
