"""The OpenAI-compatible application: FastAPI routes, one generation worker, a prefix cache.

    app = create_app(engine, ServeSettings(served_model_name="qwen"))   # engine: a QwenVLInference
    uvicorn.run(app, host="127.0.0.1", port=8000)

How a request runs
- The event loop only parses and checks the request (413 for an oversized body, 400 for a bad one,
  404 for another model name) and admits it to the queue: at most one generation runs, at most
  `max_queue` wait, the next gets 429 with a Retry-After.
- Media that the prefix cache does not hold are downloaded first, in a small pool of fetch threads,
  so a slow media server delays only its own request. Everything that touches the model then runs
  in one worker thread, in order: media decode, chat template, vision encoder, prefill, token
  decode. The loop stays free, so /health answers during a long prefill. Streamed text goes back
  to the loop token by token.
- A client that disconnects sets the job's cancel flag; the worker's stream callback raises
  generation.StopGeneration at the next token, which ends the answer there (a job still waiting is
  skipped). Stop strings end an answer the same way.

Prefix cache
A request whose prompt starts with its media (the first user message opens with the images or the
video, the default system turn) is answered through a MediaSession (session.py): the vision
encoder and the prefill of the media prefix run once, and later requests about the same media and
processing options reuse them, whatever their question or later turns. Sessions are kept least
recently used first within `prefix_cache_bytes`, counted as the KV cache of the cached prefix
tokens plus the embeddings of the uncached tail (2 x layers x kv_heads x head_dim x dtype bytes per
cached token: 56 KiB for the 7B model in bfloat16, so 2 GiB hold about 37k media tokens). A prefix
larger than the whole budget is used once and dropped. Media are keyed by URL for http(s) (a URL is
taken to name fixed content: the cache skips the download too), by the SHA-256 of a data: URI, by
path, size and mtime for allowed local files; plus fps, pixel limits, max_frames and the PSA setting.
Answers equal cold single-request answers (session.py's guarantee); the response's `stats` and the
server log say whether the prefix was a hit.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .server_protocol import ApiError, ChatRequest, Job, Result, ServeSettings, parse_request, to_api_error
from .server_worker import Worker

log = logging.getLogger("qwen_vl_psa.server")

FETCH_THREADS = 4  # downloads at once; the queue (--max-queue) bounds how many jobs can be fetching


# ----------------------------------------------------------------------------- the application


class Server:
    """State shared by the routes: settings, the worker thread, the queue count."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.worker = Worker(engine, settings)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen-vl-psa-generate")
        self.fetcher = ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="qwen-vl-psa-fetch")
        self.pending = 0  # running + waiting; only touched on the event loop
        self.jobs: set = set()  # submitted and not finished
        self.job_s = 5.0  # running average of a job's seconds, for Retry-After
        self.started = int(time.time())

    def admit(self):
        if self.pending >= 1 + self.settings.max_queue:
            retry = max(1, int(round(self.job_s * self.pending / 2)))
            self.worker.counters["rejected_queue_full"] += 1
            raise ApiError(429, f"the server is busy: one request is generating and {self.pending - 1} are "
                                "waiting (--max-queue); retry later", code="queue_full",
                           headers={"Retry-After": str(retry)})
        self.pending += 1

    def submit(self, job: Job) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()

        async def stages():
            if job.media:
                await loop.run_in_executor(self.fetcher, self.worker.fetch, job)
            return await loop.run_in_executor(self.executor, self.worker.run, job)

        future = asyncio.ensure_future(stages())
        self.jobs.add(job)

        def done(_):
            self.jobs.discard(job)
            self.pending -= 1
            self.job_s = 0.7 * self.job_s + 0.3 * (time.perf_counter() - t0)
        future.add_done_callback(done)
        return future

    def check_key(self, request: Request):
        key = self.settings.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length", "")
        too_big = length.isdigit() and int(length) > limit
        body, received = bytearray(), 0
        async for chunk in request.stream():  # read it all (up to a bound) so the client sees the 413
            received += len(chunk)
            if received > limit:
                too_big = True
                if received > 16 * limit:
                    break
            elif not too_big:
                body += chunk
        if too_big:
            raise ApiError(413, f"the request body is over the server's limit of {limit / (1 << 20):g} MiB "
                                "(--max-request-mb); send large media as an http(s) URL", code="request_too_large")
        return bytes(body)

    def stats(self) -> dict:
        return {"model": self.settings.served_model_name,
                "queue": {"running": min(self.pending, 1), "waiting": max(self.pending - 1, 0),
                          "max_queue": self.settings.max_queue},
                "prefix_cache": self.worker.cache.snapshot(), "requests": dict(self.worker.counters),
                "recent": list(self.worker.recent)}


def create_app(engine, settings: ServeSettings) -> FastAPI:
    server = Server(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for job in list(server.jobs):  # a generation still running stops at its next token
            job.cancel.set()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: (server.fetcher.shutdown(wait=True, cancel_futures=True),
                           server.executor.shutdown(wait=True, cancel_futures=True)))
        server.worker.close()

    app = FastAPI(title="qwen-vl-psa", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}; the API is under /v1 (POST /v1/chat/completions)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return ApiError(400, f"invalid request: {exc.errors()[:3]}", code="invalid_request").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.served_model_name}

    @app.get("/stats")
    async def stats(request: Request):
        server.check_key(request)
        return server.stats()

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": server.started,
            "owned_by": "qwen-vl-psa", "root": str(getattr(engine, "model_dir", settings.served_model_name)),
            "max_model_len": int(engine.max_context)}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        body = await server.read_body(request)
        req, job = parse_request(body, settings)
        server.admit()
        if req.stream:
            return await _stream(server, request, req, job)
        future = server.submit(job)
        result = await _wait(future, request, job)
        if result is None:  # the client went away
            return JSONResponse({}, status_code=499)
        return JSONResponse({
            "id": job.id, "object": "chat.completion", "created": job.created, "model": settings.served_model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": _usage(result), "stats": result.stats})

    return app


def _usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


async def _wait(future: asyncio.Future, request: Request, job: Job) -> Optional[Result]:
    """The job's result; None (and the job cancelled) if the client disconnects first."""
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            try:
                return future.result()
            except BaseException as exc:
                raise to_api_error(exc) from None
        if await request.is_disconnected():
            job.cancel.set()
            return None


async def _stream(server: Server, request: Request, req: ChatRequest, job: Job):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job.emit = lambda text: loop.call_soon_threadsafe(events.put_nowait, ("delta", text))
    future = server.submit(job)
    future.add_done_callback(lambda f: events.put_nowait(("end", f)))
    # wait for the first text (or the end) before answering 200, so errors keep their status
    first = None
    while first is None:
        try:
            first = await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return JSONResponse({}, status_code=499)
    if first[0] == "end" and first[1].exception() is not None:
        raise to_api_error(first[1].exception())
    include_usage = bool((req.stream_options or {}).get("include_usage"))
    name = server.settings.served_model_name

    def chunk(delta: dict, finish: Optional[str] = None, **extra) -> str:
        body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events_out():
        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if event[0] == "delta":
                    yield chunk({"content": event[1]})
                else:
                    f = event[1]
                    if f.exception() is not None:
                        yield f"data: {json.dumps(to_api_error(f.exception()).body())}\n\n"
                    elif f.result() is not None:
                        r = f.result()
                        yield chunk({}, r.finish_reason, stats=r.stats)
                        if include_usage:
                            body = {"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                                    "model": name, "choices": [], "usage": _usage(r)}
                            yield f"data: {json.dumps(body)}\n\n"
                    break
                event = await events.get()
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a no-op when the answer is complete; stops it when the client went away

    return StreamingResponse(events_out(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
