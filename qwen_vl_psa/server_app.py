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
import collections
import contextlib
import hashlib
import hmac
import io
import json
import logging
import mimetypes
import os
import re
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union
from urllib.parse import urlparse

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import InputError, MediaError, QwenVLError
from .generation import StopGeneration
from .options import DEFAULT_FPS, DEFAULT_MAX_TOKENS, GenerationOptions, check_fps
from .server_media import Fetched, MediaLimits, MediaRequestError, fetch_media, local_path, source_kind

log = logging.getLogger("qwen_vl_psa.server")

MAX_DECODE_PIXELS = 64_000_000  # a small file can hold a huge image: refuse it before decoding
FINISH_REASONS = {"eos": "stop", "stop": "stop", "max_tokens": "length", "cancelled": "stop"}


FETCH_THREADS = 4  # downloads at once; the queue (--max-queue) bounds how many jobs can be fetching


@dataclass
class ServeSettings:
    served_model_name: str
    api_key: Optional[str] = None
    max_queue: int = 8  # requests waiting behind the one generating
    max_request_bytes: int = 64 << 20
    media: MediaLimits = field(default_factory=MediaLimits)
    prefix_cache_bytes: int = 2 << 30  # 0: no prefix cache
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    fps: float = DEFAULT_FPS
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_frames: Optional[int] = None
    use_psa: bool = False  # for requests that do not say
    psa_config: Any = None  # the AttentionConfig of PSA-on requests (None: AttentionConfig())


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An OpenAI-shaped error response: {"error": {"message", "type", "code", "param"}}."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, param: Optional[str] = None,
                 type_: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers
        self.type = type_ or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                              500: "internal_error", 502: "upstream_error", 504: "timeout_error"}.get(
                                  status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _api_names(message: str) -> str:
    """The CLI's one-line messages name flags (--max-tokens); a request names fields (max_tokens)."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), message)


def to_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, MediaRequestError):
        return ApiError(exc.status, str(exc), code=exc.code)
    if isinstance(exc, (InputError, MediaError)):
        return ApiError(400, _api_names(str(exc)), code="invalid_media" if isinstance(exc, MediaError) else None)
    if isinstance(exc, QwenVLError):
        return ApiError(400, _api_names(str(exc)))
    log.error("internal error:\n%s", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return ApiError(500, f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                         "see the server log", code="internal_error")


# ----------------------------------------------------------------------------- request schema


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, List[Dict[str, Any]], None] = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[Dict[str, Any]] = None
    # extra parameters, as vLLM takes them (top level, or fps / pixels in mm_processor_kwargs)
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    fps: Optional[float] = None
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    max_frames: Optional[int] = None
    use_psa: Optional[bool] = None
    mm_processor_kwargs: Optional[Dict[str, Any]] = None


# OpenAI parameters this server does not implement: refused unless they hold their neutral value.
UNSUPPORTED = {
    "tools": lambda v: not v, "functions": lambda v: not v, "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"), "logprobs": lambda v: not v, "top_logprobs": lambda v: not v,
    "logit_bias": lambda v: not v, "presence_penalty": lambda v: not v, "frequency_penalty": lambda v: not v,
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is None, "modalities": lambda v: v in (None, ["text"]),
    "prediction": lambda v: v is None,
}


@dataclass(eq=False)  # kept in a set while it runs
class Job:
    """One chat request, checked, for the worker."""
    messages: list  # [{"role", "content"}] for the chat template, media as {"type": "image"/"video"}
    media: list  # URLs in prompt order
    kind: Optional[str]  # "images", "video" or None (text only)
    gen: dict  # GenerationOptions fields
    stops: List[str]
    fps: float
    min_pixels: Optional[int]
    max_pixels: Optional[int]
    max_frames: Optional[int]
    use_psa: bool
    emit: Optional[Callable[[str], None]] = None  # streamed text, called from the worker thread
    fetched: Optional[list] = None  # the media's bytes or paths, when the fetch stage got them
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Result:
    text: str
    finish_reason: str
    stopped_by: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict


def parse_request(body: bytes, settings: ServeSettings) -> (ChatRequest, Job):
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise ApiError(400, _schema_message(exc), code="invalid_request") from None
    if req.model != settings.served_model_name:
        raise ApiError(404, f"the model {req.model!r} does not exist here; this server serves "
                            f"{settings.served_model_name!r} (GET /v1/models)", code="model_not_found", param="model")
    for name, neutral in UNSUPPORTED.items():
        if name in (req.model_extra or {}) and not neutral(req.model_extra[name]):
            raise ApiError(400, f"{name} is not supported by this server", code="unsupported_parameter", param=name)
    if req.n not in (None, 1):
        raise ApiError(400, f"n must be 1 (one choice per request), got {req.n}", code="unsupported_parameter",
                       param="n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 16 or not all(stops):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 16 non-empty strings",
                       param="stop")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    gen = GenerationOptions(
        max_tokens=settings.default_max_tokens if max_tokens is None else max_tokens,
        temperature=0.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed)
    try:
        gen.validate()
        mm = dict(req.mm_processor_kwargs or {})
        fps = _first(req.fps, mm.get("fps"), settings.fps)
        check_fps(fps)
    except InputError as exc:
        raise ApiError(400, _api_names(str(exc))) from None
    messages, media, kind = _chat_messages(req.messages)
    job = Job(messages, media, kind, gen.as_dict(), stops, float(fps),
              _first(req.min_pixels, mm.get("min_pixels"), settings.min_pixels),
              _first(req.max_pixels, mm.get("max_pixels"), settings.max_pixels),
              _first(req.max_frames, mm.get("max_frames"), settings.max_frames),
              settings.use_psa if req.use_psa is None else req.use_psa)
    return req, job


def _first(*values):
    return next((v for v in values if v is not None), None)


def _schema_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def _chat_messages(messages: List[ChatMessage]) -> (list, list, Optional[str]):
    """OpenAI messages -> chat-template messages with media placeholders, the media URLs, their kind."""
    out, media, kinds = [], [], []
    for i, msg in enumerate(messages):
        role = msg.role
        if role in ("system", "developer", "assistant"):
            out.append({"role": "assistant" if role == "assistant" else "system", "content": _text_of(msg, i)})
            continue
        if role != "user":
            raise ApiError(400, f"messages[{i}]: unsupported role {role!r}; use system, user or assistant",
                           param=f"messages[{i}].role")
        if isinstance(msg.content, str) or msg.content is None:
            out.append({"role": "user", "content": [{"type": "text", "text": msg.content or ""}]})
            continue
        content = []
        for j, part in enumerate(msg.content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}: a text part needs a string 'text'", param=where)
                content.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "video_url"):
                ref = part.get(kind)
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url.strip():
                    raise ApiError(400, f"{where}: a {kind} part needs {{\"{kind}\": {{\"url\": ...}}}} with an "
                                        "http(s) URL or a data: URI", param=where)
                media.append(url)
                kinds.append("video" if kind == "video_url" else "images")
                content.append({"type": "video" if kind == "video_url" else "image"})
            else:
                raise ApiError(400, f"{where}: unsupported content type {kind!r}; use text, image_url or video_url",
                               code="unsupported_content_type", param=where)
        out.append({"role": "user", "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's (the model answers it)", param="messages")
    if not any(p.get("text", "").strip() for p in out[-1]["content"] if p["type"] == "text") and not media:
        raise ApiError(400, "the prompt is empty: say what you want to know", param="messages")
    kind = None
    if kinds:
        if len(set(kinds)) > 1:
            raise ApiError(400, "a request can have images or one video, not both", param="messages")
        kind = kinds[0]
        if kind == "video" and len(media) > 1:
            raise ApiError(400, f"a request can have one video, got {len(media)}", param="messages")
    return out, media, kind


def _text_of(msg: ChatMessage, i: int) -> str:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content or ""
    texts = []
    for j, part in enumerate(msg.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}].content[{j}]: {msg.role} messages take text parts only",
                           param=f"messages[{i}].content[{j}]")
        texts.append(part["text"])
    return "".join(texts)


# ----------------------------------------------------------------------------- the worker


class StreamFilter:
    """The engine's stream callback: applies stop strings and the cancel flag, forwards the text.

    Text that could be the start of a stop string is held back until it is known not to be one,
    so the streamed chunks always concatenate to the final answer."""

    def __init__(self, stops: List[str], emit: Optional[Callable[[str], None]], cancel: threading.Event):
        self.stops, self.emit, self.cancel = stops, emit, cancel
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent, self.cut = "", 0, None

    def __call__(self, delta: str):
        if self.cancel.is_set():
            raise StopGeneration("cancelled")
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.cut = min(hits)
            self._send(self.cut)
            raise StopGeneration("stop")
        self._send(len(self.text) - self.hold)

    def finish(self, answer: str) -> str:
        """The answer as the client gets it; the held-back rest is sent."""
        if self.cut is not None:
            return self.text[:self.cut]
        if answer.startswith(self.text[:self.sent]):
            self.text = answer
        self._send(len(self.text))
        return self.text

    def _send(self, upto: int):
        if upto > self.sent:
            if self.emit is not None:
                self.emit(self.text[self.sent:upto])
            self.sent = upto


class PrefixCache:
    """MediaSessions by media key, least recently used evicted first, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = self.too_large = 0
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def contains(self, key: str) -> bool:
        """Without touching the LRU order or the counters (the fetch stage asks)."""
        with self.lock:
            return key in self.entries

    def get(self, key: str):
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, session, nbytes: int) -> bool:
        evicted = []
        with self.lock:
            if nbytes > self.budget:
                self.too_large += 1
                evicted.append(session)
                kept = False
            else:
                self.entries[key] = (session, nbytes)
                self.bytes += nbytes
                while self.bytes > self.budget:
                    _, (old, size) = self.entries.popitem(last=False)
                    self.bytes -= size
                    self.evictions += 1
                    evicted.append(old)
                kept = True
        for s in evicted:
            s.close()
        return kept

    def clear(self):
        with self.lock:
            sessions = [s for s, _ in self.entries.values()]
            self.entries.clear()
            self.bytes = 0
        for s in sessions:
            s.close()

    def snapshot(self) -> dict:
        with self.lock:
            return {"budget_bytes": self.budget, "bytes": self.bytes, "entries": len(self.entries),
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "too_large": self.too_large}


class Worker:
    """Runs jobs one at a time on the model (called in the single worker thread)."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.cache = PrefixCache(settings.prefix_cache_bytes)
        self.tmp = tempfile.mkdtemp(prefix="qwen-vl-psa-serve-")
        self.counters = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=32)  # the last jobs, newest last

    def close(self):
        self.cache.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, job: Job) -> Optional[Result]:
        if job.cancel.is_set():  # the client left while the job waited
            self.counters["cancelled_waiting"] += 1
            return None
        from .prompt import MediaInput, template_parts
        from .session import MediaSession

        e = self.engine
        t0 = time.perf_counter()
        psa = self._psa(job)
        if psa is not None:
            e.enable_psa(psa)
        else:
            e.disable_psa()
        text = e.prompts.chat_text(job.messages[-1]["content"], history=job.messages[:-1])
        filt = StreamFilter(job.stops, job.emit, job.cancel)
        gen = dict(job.gen, stream=filt)
        cache = {"status": "text only" if not job.media else "off"}
        if not job.media:
            answer = e.ask_text(MediaInput([], {}, kind="text"), text, **gen)
        else:
            placeholders = [{"type": "video"}] if job.kind == "video" else [{"type": "image"}] * len(job.media)
            prefix = template_parts(e.prompts, placeholders).prefix
            if self.cache.enabled and text.startswith(prefix):
                key = self._key(job, psa)
                session = self.cache.get(key)
                hit = session is not None
                if not hit:
                    session = MediaSession(e, self._load(job))
                try:
                    answer = session.ask_text(text[len(prefix):], **gen)
                except BaseException:
                    if not hit:
                        session.close()
                    raise
                nbytes = self._session_bytes(session)
                kept = self.cache.put(key, session, nbytes) if not hit else True
                reuse = e.stats.get("reuse", {})
                cache = {"status": "hit" if hit else "miss", "key": key[:16], "kept": kept, "bytes": nbytes,
                         "prefix_tokens": session.prefix_tokens, "cached_prefix_tokens": session.cached_tokens,
                         "time_saved_s": reuse.get("time_saved_s", 0.0)}
            else:  # media not at the start of the prompt (or the cache is off): one cold run
                cache["status"] = "bypass" if self.cache.enabled else "off"
                answer = e.ask_text(self._load(job), text, **gen)
        final = filt.finish(answer)
        s = e.stats
        stopped_by = "stop" if filt.cut is not None else s.get("stopped_by", "eos")
        psa_summary = s.get("psa") or {}
        stats = {"prefix_cache": cache,
                 "psa": {k: psa_summary.get(k) for k in ("calls", "dense_prefill_calls", "sparsity")} if psa else False,
                 "input_tokens": s.get("input_tokens"), "time_to_first_token_s": s.get("time_to_first_token_s"),
                 "preprocess_s": s.get("preprocess_s"), "vision_encoder_s": s.get("vision_encoder_s"),
                 "prefill_s": s.get("prefill_s"), "decode_s": s.get("decode_s"),
                 "total_s": time.perf_counter() - t0}
        result = Result(final, FINISH_REASONS.get(stopped_by, "stop"), stopped_by,
                        int(s["input_tokens"]["total"]), int(s["output_tokens"]), stats)
        self.counters["completed" if stopped_by != "cancelled" else "cancelled"] += 1
        self.counters[f"prefix_cache_{cache['status'].replace(' ', '_')}"] += 1
        self.recent.append({"id": job.id, "stopped_by": stopped_by, "completion_tokens": result.completion_tokens,
                     "prompt_tokens": result.prompt_tokens, "prefix_cache": cache["status"]})
        log.info("%s: %s | prefix cache %s%s | %d prompt + %d completion tokens | ttft %.2f s, total %.2f s | %s",
                 job.id, f"{len(job.media)} {job.kind}" if job.media else "text", cache["status"],
                 f" ({cache['time_saved_s']:.2f} s saved)" if cache["status"] == "hit" else "",
                 result.prompt_tokens, result.completion_tokens, stats["time_to_first_token_s"] or 0.0,
                 stats["total_s"], stopped_by)
        return result

    # -- media
    def fetch(self, job: Job):
        """The fetch stage (a fetch thread, before the job's turn): download what the prefix cache
        does not already hold. The cache may still drop the entry before the job runs; then the
        worker fetches it itself."""
        if job.cancel.is_set() or not job.media:
            return
        if self.cache.enabled and self.cache.contains(self._key(job, self._psa(job))):
            return
        job.fetched = [fetch_media(url, self.settings.media) for url in job.media]

    def _psa(self, job: Job):
        return (self.settings.psa_config or _default_psa_config()) if job.use_psa else None

    def _key(self, job: Job, psa) -> str:
        parts = [job.kind]
        for url in job.media:
            kind = source_kind(url)  # refuses other schemes
            if kind == "data":
                parts.append("sha256:" + hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest())
            elif kind == "http":
                parts.append("url:" + url.strip())
            else:
                path = local_path(url, self.settings.media)  # refuses what is not allowed
                st = os.stat(path)
                parts.append(f"file:{path}:{st.st_size}:{st.st_mtime_ns}")
        opts = [job.fps if job.kind == "video" else None, job.min_pixels, job.max_pixels,
                job.max_frames if job.kind == "video" else None, repr(psa)]
        return hashlib.sha256(json.dumps([parts, opts], default=str).encode()).hexdigest()

    def _load(self, job: Job):
        e = self.engine
        fetched = job.fetched or [fetch_media(url, self.settings.media) for url in job.media]
        job.fetched = None  # the bytes are not needed after decoding
        if job.kind == "video":
            return self._load_video(fetched[0], job)
        images = [_decode_image(f) for f in fetched]
        return e.load_images(images, min_pixels=job.min_pixels, max_pixels=job.max_pixels)

    def _load_video(self, f: Fetched, job: Job):
        path, temp = f.path, None
        if path is None:  # decoders read files: the bytes go to a private temporary file
            ext = _video_suffix(f.label)
            fd, temp = tempfile.mkstemp(dir=self.tmp, suffix=ext)
            with os.fdopen(fd, "wb") as out:
                out.write(f.data)
            path = temp
        try:
            return self.engine.load_video(path, job.fps, min_pixels=job.min_pixels, max_pixels=job.max_pixels,
                                          max_frames=job.max_frames)
        except QwenVLError as exc:  # name the client's URL, not the server's temporary file
            if temp is None:
                raise
            raise type(exc)(str(exc).replace(temp, f.label)) from None
        finally:
            if temp is not None:
                os.unlink(temp)

    def _session_bytes(self, session) -> int:
        cfg = self.engine.model.config.text_config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        item = 4 if self.engine.dtype == "float32" else 2
        per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * item
        tail = (session.prefix_tokens - session.cached_tokens) * cfg.hidden_size * item
        return session.cached_tokens * per_token + tail


def _default_psa_config():
    from psa_paddle import AttentionConfig

    return AttentionConfig()


def _video_suffix(label: str) -> str:
    if label.startswith("data:"):
        mime = label[5:].split(",", 1)[0].split(";", 1)[0].lower()
        return mimetypes.guess_extension(mime) or ".mp4"
    ext = os.path.splitext(urlparse(label).path)[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".mp4"


def _decode_image(f: Fetched):
    from PIL import Image, UnidentifiedImageError

    try:
        if f.path is not None:
            if os.path.isdir(f.path):
                raise MediaError(f"{f.label} is a folder, not an image")
            image = Image.open(f.path)
        else:
            image = Image.open(io.BytesIO(f.data))
        if image.width * image.height > MAX_DECODE_PIXELS:  # checked before the pixels are decoded
            raise MediaError(f"{f.label} is {image.width}x{image.height} pixels, over the server's limit of "
                             f"{MAX_DECODE_PIXELS // 1_000_000} megapixels; send a smaller image")
        image.load()
        return image
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"cannot decode image {f.label}: unknown image format; send a PNG, JPEG, WebP, GIF or "
                         "BMP file") from None
    except Exception as exc:  # PIL's decoders raise many types
        raise MediaError(f"cannot decode image {f.label}: {' '.join(str(exc).split())[:200]}; "
                         "check the file") from None


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
