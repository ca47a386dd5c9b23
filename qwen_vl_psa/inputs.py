"""Checks on what the user typed, in milliseconds, before Paddle or the model is imported.

The command line runs `check_cli_args` first, so a typo'd path, a malformed URL, a bad option or
an empty prompts file ends with one `error:` line in a second or two, not after a 7 GB download
or a minute of model loading. Nothing is fetched or decoded here: a URL is checked for its
syntax only, a file for existing and being readable. media.py does the real opening.

Imports no Paddle, paddleformers or numpy (requests only when an input is an http(s) URL: one
HEAD request each, so a 404 is found before the model loads).
"""
from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any, List, Optional
from urllib.parse import urlparse
from urllib.request import url2pathname

from .errors import InputError, MediaError, MediaNotFoundError, ModelLoadError
from .loading import check_model_dir

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".mpg", ".mpeg",
              ".3gp", ".ts"}
PATCH_PIXELS = 28 * 28
MIN_FRAMES = 2
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.~%-]+)$")


def url_scheme(text: str) -> Optional[str]:
    match = _URL_RE.match(text)
    return match.group(1).lower() if match else None


def file_url_path(url: str) -> str:
    """file:///abs/path -> /abs/path. The reference simply drops "file://", so the literal rest
    wins when it exists; otherwise percent-escapes are decoded."""
    raw = url[len("file://"):]
    if raw.startswith("localhost/"):
        raw = raw[len("localhost"):]
    decoded = url2pathname(raw)
    return raw if os.path.exists(raw) or not os.path.exists(decoded) else decoded


def _is_pil(src: Any) -> bool:
    return type(src).__module__.startswith("PIL.") and hasattr(src, "size") and hasattr(src, "mode")


def guess_media_type(src: Any) -> Optional[str]:
    """Return "image", "video" or None from a PIL image, a list (frames), a data URI's MIME type,
    a file extension or a local folder (frames: a video). Nothing is opened or fetched."""
    if _is_pil(src):
        return "image"
    if isinstance(src, (list, tuple)):
        return "video" if src else None
    if not isinstance(src, (str, os.PathLike)):
        return None
    text = os.fspath(src)
    if isinstance(src, str) and text.startswith("data:"):
        mime = text[5:].split(",", 1)[0].split(";", 1)[0].lower()
        return {"image": "image", "video": "video"}.get(mime.split("/", 1)[0])
    scheme = url_scheme(text) if isinstance(src, str) else None
    path = urlparse(text).path if scheme in ("http", "https") else text
    if scheme == "file":
        path = file_url_path(text)
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if scheme in (None, "file") and os.path.isdir(os.path.expanduser(path)):
        return "video"
    return None


def check_source(src: str, kind: Optional[str]) -> None:
    """One input as typed: a local path must exist (a folder only as a video), a URL must be
    http(s) with a host, a data URI base64. kind: "image", "video" or None (not known yet)."""
    if src.startswith("data:"):
        header = src.partition(",")[0]
        if "," not in src or not header.lower().endswith(";base64"):
            raise MediaError(f"unsupported data URI {src[:40]}...: only base64 data URIs "
                             f"(data:<type>;base64,<data>) are supported")
        return
    scheme = url_scheme(src)
    if scheme in ("http", "https"):
        host = urlparse(src).hostname or ""
        if not host or not _HOST_RE.match(host) or ".." in host:
            raise MediaError(f"malformed URL {src}: no valid host name; check the URL")
        return
    if scheme is not None and scheme != "file":
        raise MediaError(f"unsupported URL scheme {scheme}:// in {src}; use a local path, file://, http:// "
                         f"or https:// URL")
    path = file_url_path(src) if scheme == "file" else os.path.expanduser(src)
    if not os.path.exists(path):
        what = "image file" if kind == "image" else "video file or frame folder" if kind == "video" else "input"
        raise MediaNotFoundError(f"{what} not found: {path}; check the path")
    if os.path.isdir(path):
        if kind == "image":
            raise MediaError(f"{path} is a folder, not an image; a folder of frames is a video: pass "
                             f"--type video (or name an image file)")
        return
    if not os.access(path, os.R_OK):
        raise MediaError(f"cannot read {path}: permission denied; check the file's permissions")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_pixels(min_pixels: Any, max_pixels: Any, *, api: bool = False) -> None:
    """The pixel-limit rule, for the command line (flags named --min-pixels) or the Python API
    (arguments named min_pixels=)."""
    lo, hi = ("min_pixels=", "max_pixels=") if api else ("--min-pixels ", "--max-pixels ")
    if min_pixels is not None and (not _is_number(min_pixels) or min_pixels < 0):
        raise InputError(f"{lo}{min_pixels!r} must be a number >= 0")
    if max_pixels is not None and (not _is_number(max_pixels) or max_pixels < PATCH_PIXELS):
        raise InputError(f"{hi}{max_pixels!r} is smaller than one 28x28 patch; use at least {PATCH_PIXELS}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise InputError(f"{lo}{min_pixels} is larger than {hi}{max_pixels}; lower {lo.strip(' =')} or "
                         f"raise {hi.strip(' =')}")


def check_max_frames(max_frames: Any) -> None:
    if max_frames is not None and (not isinstance(max_frames, numbers.Integral) or max_frames < MIN_FRAMES):
        raise InputError(f"--max-frames must be an integer >= {MIN_FRAMES}, got {max_frames!r}")


def check_timeout(timeout: Any, name: str = "--timeout") -> None:
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        raise InputError(f"{name} must be a positive number of seconds, got {timeout!r}")


def read_prompts_file(path: str) -> List[str]:
    """The questions of a --prompts-file, one per line; an unreadable or empty file is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError:
        raise InputError(f"--prompts-file {path} is not UTF-8 text; save it as UTF-8") from None
    except IsADirectoryError:
        raise InputError(f"--prompts-file {path} is a folder; give a text file with one question per line") from None
    except OSError as e:
        raise InputError(f"cannot read --prompts-file {path}: {e.strerror}") from None
    if not prompts:
        raise InputError(f"--prompts-file {path} has no questions: write one question per line")
    return prompts


def check_model_arg(model: str) -> None:
    """A local model folder is checked now (config.json, weights); a hub id only for its form."""
    if os.path.isdir(model):
        check_model_dir(model)
        return
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"--model {model!r} is neither a folder nor a hub id like Qwen/Qwen2.5-VL-3B-Instruct; "
                             f"check the path")


def check_cli_args(args) -> None:
    """Everything about a parsed command line that can be checked without the model stack."""
    check_pixels(args.min_pixels, args.max_pixels)
    check_max_frames(args.max_frames)
    check_timeout(getattr(args, "timeout", None))
    if args.prompts_file:
        read_prompts_file(args.prompts_file)
    if args.merge:
        return
    if args.batch:
        if not os.path.isfile(args.batch):
            what = "is a folder" if os.path.isdir(args.batch) else "not found"
            raise InputError(f"--batch {args.batch} {what}: give a JSONL or text file of inputs")
    check_model_arg(args.model)
    if args.batch:
        return  # corpus mode checks its own flags and items (a bad item fails alone)
    for src in args.input or []:
        check_source(src, args.type or guess_media_type(src))
    urls = [src for src in args.input or [] if url_scheme(src) in ("http", "https")]
    if urls:
        from .fetch import DEFAULT_TIMEOUT, probe  # requests: light, no Paddle

        for url in urls:
            probe(url, getattr(args, "timeout", None) or DEFAULT_TIMEOUT)
