"""The OpenAI chat-completions protocol as the server speaks it: settings, OpenAI-shaped errors, the
request schema and its checks (a request becomes a `Job` for the worker), the `Result` going back, and
`stop` strings (`StreamFilter`)."""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InputError, MediaError, QwenVLError
from .generation import StopGeneration
from .options import DEFAULT_FPS, DEFAULT_MAX_TOKENS, GenerationOptions, check_fps
from .server_media import MediaLimits, MediaRequestError

log = logging.getLogger("qwen_vl_psa.server")

FINISH_REASONS = {"eos": "stop", "stop": "stop", "max_tokens": "length", "cancelled": "stop"}



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




# ----------------------------------------------------------------------------- stop strings


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
