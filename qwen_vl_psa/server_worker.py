"""The server's model side, in its one worker thread: a job's media fetched (or found in the prefix
cache), decoded and answered through the engine; `PrefixCache` keeps `MediaSession`s of recent media,
least recently used evicted first, within a byte budget (see server_app.py's docstring)."""
from __future__ import annotations

import collections
import hashlib
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
from typing import Optional
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from psa_paddle import AttentionConfig

from .errors import MediaError, QwenVLError
from .prompt import MediaInput, template_parts
from .server_media import Fetched, fetch_media, local_path, source_kind
from .server_protocol import FINISH_REASONS, Job, Result, ServeSettings, StreamFilter
from .session import MediaSession

log = logging.getLogger("qwen_vl_psa.server")

MAX_DECODE_PIXELS = 64_000_000  # a small file can hold a huge image: refuse it before decoding


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
    return AttentionConfig()


def _video_suffix(label: str) -> str:
    if label.startswith("data:"):
        mime = label[5:].split(",", 1)[0].split(";", 1)[0].lower()
        return mimetypes.guess_extension(mime) or ".mp4"
    ext = os.path.splitext(urlparse(label).path)[1].lower()
    return ext if re.fullmatch(r"\.[a-z0-9]{1,5}", ext) else ".mp4"


def _decode_image(f: Fetched):

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

