"""The Ray Serve application: an OpenAI-style HTTP ingress over a model deployment that holds the
base once per replica and batches the requests of different accounts together.

Routing uses Serve's model multiplexing (the account id is the multiplexed model id), so a request
goes to a replica that already holds its account's delta. Serve's own @serve.batch splits batches
by multiplexed id (one account per batch), so the replica batches itself: requests queue, and a
batcher takes up to `max_batch` of them, whatever their accounts, into one DeltaBatchEngine call.
"""

# No `from __future__ import annotations` here: FastAPI reads the body models from the methods' real
# annotations (as strings, in Serve's class-based view, it took `body` for a query parameter).
import asyncio
import time
import uuid

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from tkllm_ray.serve.api import ApiError, ChatBody, CompletionBody, KeyRing, parse_model
from tkllm_ray.serve.delta_cache import DeltaCache, DeltaLoadError, UnknownAccount
from tkllm_ray.serve.engine import DeltaBatchEngine, GenRequest


@serve.deployment
class DeltaModel:
    def __init__(self, model: str, tokenizer: str, deltas: str, device: str = "cpu", device_cache_mb: int = 1024,
                 host_cache_mb: int = 4096, max_batch: int = 16, batch_wait_ms: float = 5.0, storage=None):
        from tkllm_ray.data.tokenizer import load_tokenizer
        from tkllm_ray.models import fingerprint
        from tkllm_ray.models.load import load_base_model

        self.tok = load_tokenizer(tokenizer, storage)
        base = load_base_model(model, len(self.tok), device=device, options=storage, tokenizer_name=tokenizer)
        self.cache = DeltaCache(deltas, device, device_cache_mb << 20, host_cache_mb << 20, fingerprint(base),
                                next(base.parameters()).dtype, storage)
        self.engine = DeltaBatchEngine(base, pad_id=self.tok.pad_token_id or 0)
        self.max_batch, self.wait_s = max_batch, batch_wait_ms / 1e3
        self.queue: asyncio.Queue | None = None

    @serve.multiplexed(max_num_models_per_replica=256)
    async def account_version(self, account: str) -> str:
        """Loads the account's delta into this replica's cache; what Serve's router records, so
        later requests for the account come here."""
        return (await self.cache.aget(account)).version

    async def generate(self, req: dict) -> dict:
        """{prompt, account, max_tokens, temperature, top_p, seed, stop} -> {text, tokens, ...} or
        {error: {status, message, type}} for this request alone."""
        try:
            if req["account"] is not None:
                await self.account_version(req["account"])
        except UnknownAccount as e:
            return {"error": {"status": 404, "message": str(e), "type": "model_not_found"}}
        except DeltaLoadError as e:
            return {"error": {"status": 500, "message": str(e), "type": "delta_error"}}
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batcher())
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((req, done))
        return await done

    async def _batcher(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                await self._run(batch)
            except Exception as e:  # never leave a caller waiting
                for _, done in batch:
                    if not done.done():
                        done.set_result({"error": {"status": 500, "message": f"generation failed: {e}",
                                                   "type": "server_error"}})

    async def _run(self, batch: list) -> None:
        reqs, live = [], []
        for req, done in batch:
            try:
                delta = (await self.cache.aget(req["account"])).delta if req["account"] is not None else None
            except (UnknownAccount, DeltaLoadError) as e:
                done.set_result({"error": {"status": 404 if isinstance(e, UnknownAccount) else 500,
                                           "message": str(e), "type": "delta_error"}})
                continue
            ids = self.tok(req["prompt"], add_special_tokens=False)["input_ids"]
            stops = [self.tok(s, add_special_tokens=False)["input_ids"] for s in req["stop"]]
            reqs.append(GenRequest(ids, delta, req["max_tokens"], req["temperature"], req["top_p"], req["seed"],
                                   stops, self.tok.eos_token_id))
            live.append(done)
        outs = await asyncio.to_thread(self.engine.generate, reqs) if reqs else []
        for (r, done), tokens in zip(zip(reqs, live), outs):
            text = self.tok.decode(tokens, skip_special_tokens=True)
            stopped = len(tokens) < r.max_tokens
            for s in [s for s in (self.tok.decode(t) for t in r.stop) if s in text]:
                text, stopped = text[: text.index(s)], True
            done.set_result({"text": text, "prompt_tokens": len(r.prompt), "completion_tokens": len(tokens),
                             "finish_reason": "stop" if stopped else "length"})


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
                if body.stream:
                    raise ApiError(400, "stream: server-sent events are not served yet; send stream=false",
                                   "invalid_request_error")
                account = parse_model(body.model, base_name)
                if keys is not None:
                    keys.check(authorization, account)
            except ApiError as e:
                return JSONResponse(status_code=e.status, content=e.body())
            req = {"prompt": prompt, "account": account, "max_tokens": body.max_tokens,
                   "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed, "stop": body.stop or []}
            handle = self.model.options(multiplexed_model_id=account) if account else self.model
            out = await handle.generate.remote(req)
            if "error" in out:
                err = out["error"]
                return JSONResponse(status_code=err["status"], content={"error": {k: err[k] for k in ("message", "type")}})
            usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                     "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
            choice = {"index": 0, "finish_reason": out["finish_reason"]}
            choice.update({"message": {"role": "assistant", "content": out["text"]}} if chat else {"text": out["text"]})
            return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                    "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                    "model": body.model, "choices": [choice], "usage": usage}

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

        @app.get("/v1/models")
        async def models(self):
            return {"object": "list", "data": [{"id": base_name, "object": "model", "owned_by": "tkllm-ray"}]}

        @app.get("/healthz")
        async def healthz(self):
            return {"ok": True}

    return Ingress


def build_app(model: str, tokenizer: str, deltas: str, base_name: str | None = None, keys: KeyRing | None = None,
              deployment_options: dict | None = None, **model_kwargs):
    """The application `serve.run` deploys: Ingress -> DeltaModel (`model_kwargs`: DeltaModel's
    device, cache sizes, batching, storage; `deployment_options`: replicas, autoscaling, resources)."""
    base_name = base_name or model.rstrip("/").rsplit("/", 1)[-1]
    replica = DeltaModel.options(**(deployment_options or {})).bind(model, tokenizer, deltas, **model_kwargs)
    return build_ingress(base_name, keys).bind(replica)
