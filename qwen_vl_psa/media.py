"""Media inputs for Qwen2.5-VL: images and videos in, resized PIL images / uint8 frames out.

Public API:
    load_image(src, ...) -> PIL.Image.Image (RGB, sides multiples of 28)
    load_video(src, ...) -> Video (frames uint8 [T, H, W, 3], T even, H and W multiples of 28)
    guess_media_type(src) -> "image" | "video" | None

Sampling and resize follow the Qwen2.5-VL reference pipeline (qwen-vl-utils, as ported in
paddleformers.transformers.qwen2_vl.vision_process). Its helpers (smart_resize, smart_nframes and
the token-count constants) are reused, not rewritten; what we add is input handling, decoding
(paddleformers' own video reader does not work here) and errors that say what to do.

Every problem with the user's input raises one of the errors.py classes with a one-line message:
MediaNotFoundError (a missing local file or folder), MediaError (cannot fetch, open or decode;
a shape the model cannot take), InputError (a bad argument).

Where this module deliberately differs from paddleformers' vision_process:
- Video frames are resized with PIL bicubic per frame instead of Paddle's antialiased bicubic on
  the tensor: at most a couple of 8-bit levels apart (tested). Images use PIL bicubic, as there.
- A max_pixels below the default min_pixels drops that default to one patch instead of failing.
- Transparency is composited over white for every mode with alpha (the reference: RGBA only).
- EXIF orientation is applied (the reference ignores it: portrait phone photos went in
  sideways); 16-bit and float images are scaled to 8 bits (PIL's convert clipped them to white);
  an animated image uses its first frame, with a notice (info["notices"]).
- A video whose container claims clearly more time than decodes (a truncated download) gets a
  notice with both durations (Video.notices, container_duration_s).
- Frame folders / lists longer than max_frames (default 768) are sampled down (linspace rule);
  the reference takes every frame. Each frame goes through the image rule with factor 28, as in
  qwen-vl-utils; paddleformers' fetch_video passes 28 as the patch size there (factor 56), a
  slip of the port that is not reproduced.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import math
import mimetypes
import numbers
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from paddleformers.transformers.qwen2_vl import vision_process as _vp
from paddleformers.transformers.qwen2_vl.vision_process import (
    FPS,
    FPS_MAX_FRAMES,
    FRAME_FACTOR,
    IMAGE_MAX_TOKEN_NUM,
    IMAGE_MIN_TOKEN_NUM,
    MAX_RATIO,
    SPATIAL_MERGE_SIZE,
    VIDEO_MAX_TOKEN_NUM,
    VIDEO_MIN_TOKEN_NUM,
    ceil_by_factor,
    floor_by_factor,
    smart_nframes,
    smart_resize,
)
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, MediaError, MediaNotFoundError, QwenVLError
from .fetch import DEFAULT_TIMEOUT, cache_folder, cache_name, download, fetch_bytes, one_line, part_file, publish
from .inputs import IMAGE_EXTS, VIDEO_EXTS, check_pixels, guess_media_type  # noqa: F401 (re-exported)
from .inputs import file_url_path as _file_url_path
from .inputs import url_scheme as _url_scheme

PATCH_SIZE = 14  # Qwen2.5-VL vision patch side
FACTOR = PATCH_SIZE * SPATIAL_MERGE_SIZE  # 28: one merged token covers a 28x28 pixel square
PATCH_PIXELS = FACTOR * FACTOR

IMAGE_MIN_PIXELS = IMAGE_MIN_TOKEN_NUM * PATCH_PIXELS
IMAGE_MAX_PIXELS = IMAGE_MAX_TOKEN_NUM * PATCH_PIXELS
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKEN_NUM * PATCH_PIXELS
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKEN_NUM * PATCH_PIXELS

BACKENDS = ("auto", "decord", "pyav")

Source = Union[str, os.PathLike, Image.Image]


@dataclass
class Video:
    """Sampled, resized video frames plus what the processor and the stats need."""

    frames: np.ndarray  # uint8 [T, H, W, 3], T even, H and W multiples of 28
    sample_fps: float  # frames per second of `frames` (what the model's temporal positions use)
    source_fps: float  # frame rate of the source (for a frame folder: the `fps` asked for)
    total_frames: int  # frames in the source
    frame_indices: list  # source frame index of each sampled frame
    duration_s: float  # source length in seconds
    timings: dict = field(default_factory=dict)  # fetch_s, decode_s, resize_s
    backend: str = ""  # "decord", "pyav" or "frames"
    container_duration_s: Optional[float] = None  # what the file's header claims (None: unknown)
    notices: list = field(default_factory=list)  # what the user should know (a truncated file)


# ----------------------------------------------------------------------------- public API


def load_image(src: Source, *, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
               cache_dir: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT,
               on_downsize: Optional[Callable[[str, tuple, tuple], None]] = None) -> Image.Image:
    """Open an image and resize it the Qwen2.5-VL way.

    src: local path, file:// URL, http(s) URL, data:image/...;base64 URI or a PIL image.
    Pixel limits default to the reference's 4 .. 16384 tokens (x 28*28 pixels). A remote image is
    fetched into memory, or into `cache_dir` (reused next time) when one is given.
    on_downsize(label, (width, height), (new_width, new_height)) is called when max_pixels
    shrinks the image (the engine prints its CPU-cap notice with it). The result's
    info["notices"] lists what the user should know (only the first frame of an animated GIF /
    WebP / APNG is used); the engine prints them and puts them in the stats.
    """
    min_pixels, max_pixels = _image_pixel_limits(min_pixels, max_pixels)
    _check_timeout(timeout)
    label = _describe(src)
    opened = _open_image(src, label, cache_dir, timeout)
    frames = opened.info.get("frames_in_file", 1)
    notices = list(opened.info.get("notices", ())) if isinstance(src, Image.Image) else []
    if frames > 1 and not isinstance(src, Image.Image):
        notices.append(f"{label} is animated ({frames} frames); only the first frame is used (for all of "
                       f"them, save the frames to a folder and pass it with --type video)")
    image = _to_rgb(opened)
    width, height = image.size
    new_h, new_w = _smart_size(height, width, min_pixels, max_pixels, label)
    if on_downsize is not None and width * height > max_pixels:
        on_downsize(label, (width, height), (new_w, new_h))
    # PIL bicubic is what the reference's fetch_image uses (Image.resize's default filter).
    out = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    out.info["frames_in_file"] = frames
    out.info["notices"] = notices  # what the user should know; the engine prints them
    return out


def load_video(src: Union[Source, Sequence[Source]], *, fps: float = FPS,
               min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
               total_pixels: Optional[float] = None, max_frames: Optional[int] = None,
               cache_dir: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT, progress: bool = True,
               backend: str = "auto") -> Video:
    """Open a video, sample frames at `fps` and resize them the Qwen2.5-VL way.

    src: local video file, file:// or http(s) URL (downloaded once into `cache_dir`, default
    ./model_cache/media), data:video/...;base64 URI, a folder of frame images (sorted by name,
    numbers in names compared as numbers) or a list of image sources.
    backend: "auto" (decord, then PyAV when decord is missing or fails), "decord" or "pyav".

    Frame sizes: smart_resize to multiples of 28 between min_pixels (default 128 tokens) and
    max(min(768 tokens, total_pixels / T * 2), 1.05 * min_pixels), which a user max_pixels can
    only lower; total_pixels defaults to MODEL_SEQ_LEN * 28*28 * 0.9 (all as the reference).
    A frame folder with an odd count is padded by repeating its last frame (reference rule).
    """
    _check_video_args(fps, max_frames, backend)
    _check_timeout(timeout)
    min_pixels, max_pixels = _checked_pixel_limits(min_pixels, max_pixels)
    total_pixels = _checked_total_pixels(total_pixels)
    timings = {"fetch_s": 0.0, "decode_s": 0.0, "resize_s": 0.0}
    if isinstance(src, (list, tuple)):
        return _load_frame_list(list(src), "frame list", fps, min_pixels, max_pixels, total_pixels,
                                max_frames, cache_dir, timeout, timings)
    start = time.perf_counter()
    path, label = _video_file(src, cache_dir, timeout, progress)
    timings["fetch_s"] = time.perf_counter() - start
    if path.is_dir():
        return _load_frame_list(_frame_files(path), str(path), fps, min_pixels, max_pixels,
                                total_pixels, max_frames, cache_dir, timeout, timings)

    def choose(total_frames: int, video_fps: float) -> list:
        return _sample_indices(total_frames, video_fps, fps, max_frames, label)

    start = time.perf_counter()
    frames, total, video_fps, indices, used = _decode_video(path, label, choose, backend)
    timings["decode_s"] = time.perf_counter() - start
    frames, timings["resize_s"] = _resize_video(frames, min_pixels, max_pixels, total_pixels, label)
    decoded_s, claimed_s = total / video_fps, _container_duration(path)
    notices = []
    if claimed_s is not None and claimed_s - decoded_s > max(0.5, 0.1 * claimed_s):
        notices.append(f"video {label}: only {decoded_s:.1f} s of its {claimed_s:.1f} s could be decoded (the "
                       f"file looks truncated); the answer covers that part only: download or copy it again")
    return Video(frames=frames, sample_fps=len(indices) / max(total, 1e-6) * video_fps,
                 source_fps=video_fps, total_frames=total, frame_indices=list(indices),
                 duration_s=decoded_s, timings=timings, backend=used, container_duration_s=claimed_s,
                 notices=notices)


# ----------------------------------------------------------------------------- argument checks


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_timeout(timeout: Any) -> None:
    if not _is_number(timeout) or timeout <= 0:
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _check_video_args(fps: Any, max_frames: Any, backend: Any) -> None:
    if not _is_number(fps) or fps <= 0:
        raise InputError(f"fps must be a positive number of frames per second, got {fps!r}; "
                         f"e.g. fps={FPS}")
    if max_frames is not None and (not isinstance(max_frames, numbers.Integral)
                                   or isinstance(max_frames, bool) or max_frames < FRAME_FACTOR):
        raise InputError(f"max_frames must be an integer >= {FRAME_FACTOR}, got {max_frames!r}")
    if backend not in BACKENDS:
        raise InputError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)}")


def _checked_pixel_limits(min_pixels: Any, max_pixels: Any) -> tuple:
    """Explicit limits only: None stays None (the defaults depend on image vs video)."""
    check_pixels(min_pixels, max_pixels, api=True)  # the command line's rule, with the API's names
    return min_pixels, max_pixels


def _checked_total_pixels(total_pixels: Any) -> float:
    if total_pixels is None:
        # Read at call time, like the reference: MODEL_SEQ_LEN comes from the environment.
        return _vp.MODEL_SEQ_LEN * PATCH_PIXELS * 0.9
    if not _is_number(total_pixels) or total_pixels < PATCH_PIXELS:
        raise InputError(f"total_pixels={total_pixels!r} is smaller than one {FACTOR}x{FACTOR} "
                         f"patch; use at least {PATCH_PIXELS}")
    return total_pixels


def _default_min(default: int, min_pixels: Optional[float], max_pixels: Optional[float]) -> float:
    """A user max_pixels below the default min (where the reference fails an assert) drops the
    default min to one patch: no upscaling, and max_pixels holds. Lowering it to max_pixels
    instead would make smart_resize's upscaling round past max_pixels almost every time."""
    if min_pixels is not None:
        return min_pixels
    if max_pixels is not None and max_pixels < default:
        return PATCH_PIXELS
    return default


def _image_pixel_limits(min_pixels: Any, max_pixels: Any) -> tuple:
    """(min_pixels, max_pixels) with the reference's image defaults (4..16384 tokens)."""
    min_pixels, max_pixels = _checked_pixel_limits(min_pixels, max_pixels)
    min_pixels = _default_min(IMAGE_MIN_PIXELS, min_pixels, max_pixels)
    if max_pixels is None:
        max_pixels = IMAGE_MAX_PIXELS
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels={min_pixels} is larger than the default max_pixels="
                         f"{max_pixels}; pass max_pixels too")
    return min_pixels, max_pixels


# ----------------------------------------------------------------------------- sizes and sampling


def _smart_size(height: int, width: int, min_pixels: float, max_pixels: float, label: str,
                fix: str = "raise max_pixels") -> tuple:
    """paddleformers' smart_resize with its assert / ValueError turned into our errors."""
    if height < 1 or width < 1:
        raise MediaError(f"{label} is empty ({width}x{height} pixels); check the file")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise MediaError(f"{label} is {width}x{height}, aspect ratio {ratio:.0f}:1; Qwen2.5-VL "
                         f"takes at most {MAX_RATIO}:1, crop or pad it")
    try:
        new_h, new_w = smart_resize(height, width, factor=FACTOR, min_pixels=min_pixels,
                                    max_pixels=max_pixels)
    except (AssertionError, ValueError) as exc:  # checked above; kept for a changed helper
        raise MediaError(f"cannot size {label} ({width}x{height}): {exc}") from None
    if new_h < FACTOR or new_w < FACTOR:
        # smart_resize floors the short side to 0 when max_pixels is tight for the aspect ratio.
        raise MediaError(f"{label} ({width}x{height}) cannot be scaled to whole {FACTOR}x{FACTOR} "
                         f"patches within max_pixels={max_pixels:g} at this aspect ratio; {fix}")
    return new_h, new_w


def _linspace_indices(last: int, count: int) -> list:
    """round(linspace(0, last, count)) exactly as the reference computes it with paddle: float32
    values, step in float32, the second half counted back from the end, rounding half to even.
    float64 would pick a neighbouring frame in some long videos (tests compare with paddle)."""
    if count == 1:
        return [0]
    i = np.arange(count, dtype=np.float32)
    stop = np.float32(last)
    step = np.float32(stop / np.float32(count - 1))
    values = np.where(i < count // 2, step * i, stop - step * (np.float32(count - 1) - i))
    return [int(v) for v in np.round(values.astype(np.float32))]


def _sample_indices(total_frames: int, video_fps: float, fps: float, max_frames: Optional[int],
                    label: str) -> list:
    if total_frames < FRAME_FACTOR:
        raise MediaError(f"video {label} has {total_frames} frame(s); Qwen2.5-VL needs at least "
                         f"{FRAME_FACTOR}: use a longer video or pass it as an image")
    if not _is_number(video_fps) or video_fps <= 0:
        raise MediaError(f"video {label} reports no usable frame rate ({video_fps!r}); "
                         f"re-encode it or pass its frames as a folder")
    ele = {"fps": fps}
    if max_frames is not None:
        ele["max_frames"] = max_frames
    try:
        nframes = smart_nframes(ele, total_frames=total_frames, video_fps=video_fps)
    except (AssertionError, ValueError) as exc:
        raise MediaError(f"cannot sample frames from video {label}: {exc}") from None
    return _linspace_indices(total_frames - 1, nframes)


def _video_max_pixels(nframes: int, min_pixels: float, max_pixels: Optional[float],
                      total_pixels: float) -> float:
    """The reference's per-frame cap: spread total_pixels over the frames (two frames share one
    temporal patch), within [1.05 * min_pixels, 768 tokens]; a user max_pixels only lowers it."""
    cap = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return cap if max_pixels is None else min(max_pixels, cap)


def _resize_video(frames: np.ndarray, min_pixels: Optional[float], max_pixels: Optional[float],
                  total_pixels: float, label: str) -> tuple:
    """Resize all frames to the reference's size; returns (frames, seconds)."""
    start = time.perf_counter()
    min_pixels = _default_min(VIDEO_MIN_PIXELS, min_pixels, max_pixels)
    cap = _video_max_pixels(len(frames), min_pixels, max_pixels, total_pixels)
    height, width = frames.shape[1:3]
    new_h, new_w = _smart_size(height, width, min_pixels, cap, f"video {label}",
                               "raise max_pixels or total_pixels, or sample fewer frames")
    return _resize_frames(frames, new_h, new_w), time.perf_counter() - start


def _resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """PIL bicubic per frame. The reference resizes the uint8 frame tensor with Paddle's
    antialiased bicubic instead; both are antialiased bicubic filters and differ by at most a
    couple of 8-bit levels on sharp edges, far less on average (tests/test_media.py checks it)."""
    if frames.shape[1:3] == (height, width):
        return np.ascontiguousarray(frames)
    out = np.empty((len(frames), height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height),
                                                          Image.Resampling.BICUBIC))
    return out


# ----------------------------------------------------------------------------- sources


def _describe(src: Any) -> str:
    """A short name for messages: data URIs are cut, PIL images described."""
    if isinstance(src, Image.Image):
        return f"<PIL image {src.width}x{src.height} {src.mode}>"
    text = os.fspath(src) if isinstance(src, (str, os.PathLike)) else repr(src)
    if isinstance(text, str) and text.startswith("data:") and len(text) > 60:
        return f"{text[:40]}...({len(text)} chars)"
    return str(text)


def _source_kind(src: Any, what: str) -> tuple:
    """(kind, value): kind is "pil", "path", "http" or "data"; rejects other types and schemes."""
    if isinstance(src, Image.Image):
        return "pil", src
    if isinstance(src, os.PathLike):
        return "path", os.fspath(src)
    if not isinstance(src, str):
        accepted = ("a path, file:// or http(s) URL, data URI or PIL image" if what == "image"
                    else "a path, frame folder, list of frames, file:// or http(s) URL or data URI")
        raise InputError(f"unsupported {what} input of type {type(src).__name__}; pass {accepted}")
    if src.startswith("data:"):
        return "data", src
    scheme = _url_scheme(src)
    if scheme in ("http", "https"):
        return "http", src
    if scheme == "file":
        return "path", _file_url_path(src)
    if scheme is not None:
        raise MediaError(f"unsupported URL scheme {scheme}:// in {src}; use a local path, "
                         f"file://, http:// or https:// URL")
    return "path", os.path.expanduser(src)


def _existing_path(path: str, what: str) -> Path:
    if not os.path.exists(path):
        raise MediaNotFoundError(f"{what} not found: {path}; check the path")
    return Path(path)


def _data_uri_bytes(uri: str, label: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise MediaError(f"unsupported data URI {label}: only base64 data URIs "
                         f"(data:<type>;base64,<data>) are supported")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"invalid base64 in data URI {label}: {exc}; re-encode the file") from None


# ----------------------------------------------------------------------------- images


def _open_image(src: Any, label: str, cache_dir: Optional[str], timeout: float) -> Image.Image:
    kind, value = _source_kind(src, "image")
    if kind == "pil":
        return value
    if kind == "data":
        return _decode_image(io.BytesIO(_data_uri_bytes(value, label)), label)
    if kind == "http":
        if cache_dir is not None:
            path = download(value, cache_dir, timeout, progress=False, check=_image_problem, what="an image")
            return _decode_image(path, f"{value} (cached as {path})")
        return _decode_image(io.BytesIO(fetch_bytes(value, timeout)), label)
    path = _existing_path(value, "image file")
    if path.is_dir():
        raise MediaError(f"{path} is a folder, not an image; pass an image file "
                         f"(a folder of frames is a video: --type video, or load_video in Python)")
    return _decode_image(path, label)


def _decode_image(source: Any, label: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            frames = getattr(image, "n_frames", 1)
            image.load()  # decode now, so a truncated file fails here and not later
            if frames > 1:
                image.info["frames_in_file"] = frames  # read by load_image for its notice
            oriented = ImageOps.exif_transpose(image)  # a portrait phone photo stays upright
            if oriented is not image:
                oriented.info.setdefault("frames_in_file", frames)
            return oriented
    except QwenVLError:
        raise
    except Image.DecompressionBombError as exc:  # PIL refuses > 2x MAX_IMAGE_PIXELS (179 MP) unread
        size = one_line(exc).split(" could be")[0].rstrip(",")
        raise MediaError(f"cannot decode image {label}: {size}; that is more than PIL decodes safely: "
                         f"downscale it first") from None
    except UnidentifiedImageError:  # its text names a BytesIO object: say it plainly
        raise MediaError(f"cannot decode image {label}: unknown image format; "
                         f"is it a valid image file?") from None
    except Exception as exc:  # PIL's decoders raise many types (OSError, SyntaxError, ...)
        raise MediaError(f"cannot decode image {label}: {one_line(exc)}; "
                         f"is it a valid image file?") from None


def _image_problem(path: Path) -> Optional[str]:
    """None when `path` opens as an image (header and structure: PIL's verify), else why not."""
    try:
        with Image.open(path) as image:
            image.verify()
        return None
    except UnidentifiedImageError:
        return "not an image format PIL knows"
    except Exception as exc:  # truncated, corrupt: PIL raises many types
        return one_line(exc)


def _video_problem(path: Path) -> Optional[str]:
    """None when `path` opens as a video with a video stream (PyAV, else decord), else why not."""
    try:
        import av
    except ImportError:
        try:
            import decord
            decord.VideoReader(str(path))
            return None
        except ImportError:
            return None  # nothing to check with: the decode step reports problems
        except Exception as exc:
            return one_line(exc)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no video stream"
        return None
    except Exception as exc:  # av.FFmpegError and friends
        return one_line(exc)


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float images scaled to 8-bit grey. PIL's convert() clips them
    at 255 (a 16-bit PNG came out almost all white): 16-bit types divide by 257; "I" and "F"
    use the range of their type when the values fit it (0..65535, or 0..1), else their own."""
    data = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = data / 257.0
    else:
        lo, hi = float(data.min()), float(data.max())
        if image.mode == "F" and lo >= 0 and hi <= 1.0:
            scaled = data * 255.0
        elif lo >= 0 and hi <= 255 and image.mode == "I":  # 8-bit values held as integers
            scaled = data
        elif lo >= 0 and hi <= 65535:
            scaled = data / 257.0
        else:
            scaled = (data - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited over white (the reference does it for RGBA only);
    16-bit and float images scaled to 8 bits. EXIF orientation was applied on decoding (the
    reference pipeline ignores it, so portrait phone photos went in sideways)."""
    if image.mode in _HIGH_DEPTH:
        return _to_8bit(image).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


# ----------------------------------------------------------------------------- videos


def _video_file(src: Any, cache_dir: Optional[str], timeout: float, progress: bool) -> tuple:
    """A local path (file or frame folder) for any video source, and its name for messages."""
    kind, value = _source_kind(src, "video")
    label = _describe(src)
    if kind == "pil":
        raise InputError(f"{label} is a single image, not a video; use load_image, or pass a "
                         f"list of images / a folder of frames")
    if kind == "http":
        path = download(value, cache_dir, timeout, progress, check=_video_problem, what="a video")
        return path, f"{value} (cached as {path})"
    if kind == "data":
        return _data_uri_file(value, label, cache_dir), label
    return _existing_path(value, "video file or frame folder"), label


def _data_uri_file(uri: str, label: str, cache_dir: Optional[str]) -> Path:
    """Decoders read files, so an inline video is written to the cache (named by content)."""
    data = _data_uri_bytes(uri, label)
    mime = uri[5:].split(",", 1)[0].split(";", 1)[0].lower()
    folder = cache_folder(cache_dir)
    target = folder / cache_name(hashlib.sha256(data).hexdigest(),
                                  mimetypes.guess_extension(mime) or "")
    if not target.is_file():
        handle, part = part_file(folder, target)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            publish(part, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
    return target


def _decode_video(path: Path, label: str, choose: Callable, backend: str) -> tuple:
    """(frames [T,H,W,3] uint8, total_frames, fps, indices, backend used): decord first, PyAV
    when decord is missing or cannot read the file."""
    readers = [("decord", _read_decord), ("pyav", _read_pyav)]
    problems = []
    for name, reader in readers:
        if backend not in ("auto", name):
            continue
        try:
            return (*reader(path, choose), name)
        except QwenVLError:  # the file opened; its content is the problem (e.g. one frame)
            raise
        except ImportError:
            problems.append(f"{name} is not installed")
        except Exception as exc:  # decoders raise RuntimeError, av.FFmpegError, ...
            problems.append(f"{name}: {one_line(exc)}")
    reasons = {p.split(": ", 1)[-1] for p in problems}
    detail = reasons.pop() if len(reasons) == 1 and len(problems) > 1 else "; ".join(problems)
    detail = detail.replace(f": '{path}'", "")  # the path is in the label already
    raise MediaError(f"cannot decode video {label}: {detail}; is it a valid video file?")


def _container_duration(path: Path) -> Optional[float]:
    """Seconds the container's header claims (PyAV: the format's, else the stream's), or None."""
    try:
        import av

        with av.open(str(path)) as container:
            if container.duration:
                return container.duration / av.time_base
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
    except Exception:  # no PyAV, or it cannot read what decord could: no claim to compare with
        return None
    return None


def _read_decord(path: Path, choose: Callable) -> tuple:
    import decord  # optional: PyAV covers for it

    # decord's ffmpeg logs straight to stderr ("[h264 @ 0x..] Invalid NAL unit size" for a cut
    # file): the notice or error line says it once, in words.
    with contextlib.suppress(Exception):
        decord.logging.set_level(decord.logging.QUIET)
    problem = _video_problem(path)  # PyAV's quiet probe first: decord logs a C++ error line to stderr
    if problem is not None:
        raise RuntimeError(problem)
    reader = decord.VideoReader(str(path))
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = choose(total, fps)
    return reader.get_batch(indices).asnumpy(), total, fps, indices


def _read_pyav(path: Path, choose: Callable) -> tuple:
    import av  # optional: only needed where decord is missing or fails

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise MediaError(f"{path} has no video stream; is it an audio or image file?")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        # stream.frames is the container's count (what decord reads); 0 when unknown.
        total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
    indices = choose(total, fps)
    frames, decoded = _pyav_frames(path, indices)
    if frames is None:
        # The container promised more frames than it has: sample again from the real count.
        total = decoded
        indices = choose(total, fps)
        frames, _ = _pyav_frames(path, indices)
    return frames, total, fps, indices


def _pyav_frames(path: Path, indices: list) -> tuple:
    """Decode from the start and keep the wanted frames: (frames or None if some are missing,
    number of frames decoded)."""
    import av

    wanted, last, kept, count = set(indices), max(indices), {}, 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
            if count > last:
                break
    if len(kept) < len(wanted):
        return None, count
    return np.stack([kept[i] for i in indices]), count


# ----------------------------------------------------------------------------- frame folders


def _natural_key(name: str) -> list:
    # frame_2 before frame_10: compare digit runs as numbers.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list:
    names = [entry.name for entry in os.scandir(folder) if entry.is_file()
             and not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower()
             in IMAGE_EXTS]
    if not names:
        raise MediaError(f"frame folder {folder} has no image files "
                         f"({', '.join(sorted(IMAGE_EXTS))}); add frames or pass a video file")
    return [str(folder / name) for name in sorted(names, key=_natural_key)]


def _load_frame_list(items: list, label: str, fps: float, min_pixels: Optional[float],
                     max_pixels: Optional[float], total_pixels: float,
                     max_frames: Optional[int], cache_dir: Optional[str], timeout: float,
                     timings: dict) -> Video:
    """Frames given as images, taken as consecutive frames at `fps`. As in the reference, every
    frame goes through the image rules first, the count is padded to even by repeating the last
    frame, then the video size rule applies. Beyond max_frames (default 768) frames are sampled
    with the same linspace rule as videos."""
    if not items:
        raise MediaError(f"{label} is empty; give at least one frame")
    total = len(items)
    limit = floor_by_factor(max_frames if max_frames is not None else FPS_MAX_FRAMES, FRAME_FACTOR)
    indices = _linspace_indices(total - 1, limit) if total > limit else list(range(total))
    start = time.perf_counter()
    images = [load_image(items[i], min_pixels=min_pixels, max_pixels=max_pixels,
                         cache_dir=cache_dir, timeout=timeout) for i in indices]
    _check_same_size(images, [items[i] for i in indices], label)
    padded = ceil_by_factor(len(indices), FRAME_FACTOR)
    indices += [indices[-1]] * (padded - len(indices))
    frames = np.stack([np.asarray(images[min(k, len(images) - 1)]) for k in range(padded)])
    timings["decode_s"] = time.perf_counter() - start
    frames, timings["resize_s"] = _resize_video(frames, min_pixels, max_pixels, total_pixels, label)
    sample_fps = fps if total <= limit else limit / total * fps
    return Video(frames=frames, sample_fps=sample_fps, source_fps=fps, total_frames=total,
                 frame_indices=indices, duration_s=total / fps, timings=timings, backend="frames")


def _check_same_size(images: list, names: list, label: str) -> None:
    first = images[0].size
    for image, name in zip(images, names):
        if image.size != first:
            raise MediaError(f"frames in {label} differ in size: {_describe(names[0])} is "
                             f"{first[0]}x{first[1]} but {_describe(name)} is "
                             f"{image.size[0]}x{image.size[1]} after resizing; use frames of one "
                             f"size")
