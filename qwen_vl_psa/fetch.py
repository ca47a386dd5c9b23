"""Downloads for media inputs: one fetch into a cache folder, never a truncated file, and
requests' errors turned into one-line MediaErrors that name the URL and the fix.

A download streams into a unique .part file next to its target (with a tqdm bar on stderr) and
is renamed only when complete, so a failure, a kill or a concurrent download of the same URL
never leaves a file that looks whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import requests
from tqdm import tqdm

from .errors import InputError, MediaError

DEFAULT_CACHE_DIR = os.path.join("model_cache", "media")  # relative to the working directory
HTTP_HEADERS = {"User-Agent": "qwen2.5-vl-paddle/1.0"}  # some hosts refuse requests' default agent


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__


def _socket_reason(exc: BaseException) -> str:
    """The OS reason ("[Errno 111] Connection refused") buried in urllib3's nested messages."""
    match = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(exc))
    return match.group(0).strip() if match else one_line(exc)


@contextlib.contextmanager
def _http_errors(url: str, timeout: float) -> Iterator[None]:
    """requests' exceptions -> one MediaError naming the URL and the likely fix."""
    try:
        yield
    except requests.exceptions.SSLError as exc:
        raise MediaError(f"cannot fetch {url}: TLS certificate check failed ({one_line(exc)}); "
                         f"set REQUESTS_CA_BUNDLE to a CA bundle that trusts the server") from None
    except requests.exceptions.Timeout:
        raise MediaError(f"cannot fetch {url}: no response within {timeout:g} s; check the URL "
                         f"or raise the timeout") from None
    except requests.exceptions.ConnectionError as exc:
        raise MediaError(f"cannot fetch {url}: connection failed ({_socket_reason(exc)}); "
                         f"check the URL and that the server is reachable") from None
    except requests.exceptions.ChunkedEncodingError as exc:
        raise MediaError(f"cannot fetch {url}: download interrupted ({one_line(exc)}); "
                         f"try again") from None
    except requests.exceptions.RequestException as exc:
        raise MediaError(f"cannot fetch {url}: {one_line(exc)}; check the URL") from None


@contextlib.contextmanager
def _http_get(url: str, timeout: float) -> Iterator[requests.Response]:
    with requests.get(url, stream=True, timeout=timeout, headers=HTTP_HEADERS) as response:
        if response.status_code >= 400:
            raise MediaError(f"cannot fetch {url}: HTTP {response.status_code} "
                             f"{response.reason or ''}".rstrip() + "; check the URL")
        yield response


def _check_complete(response: requests.Response, received: int, url: str) -> None:
    """urllib3 usually catches a short body; this also covers servers it lets through."""
    expected = response.headers.get("Content-Length")
    if expected and expected.isdigit() and not response.headers.get("Content-Encoding"):
        if received != int(expected):
            raise MediaError(f"cannot fetch {url}: download incomplete ({received} of {expected} "
                             f"bytes); try again")


def fetch_bytes(url: str, timeout: float) -> bytes:
    with _http_errors(url, timeout), _http_get(url, timeout) as response:
        data = response.content
        _check_complete(response, len(data), url)
        return data


def cache_name(key: str, suffix: str) -> str:
    suffix = suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,5}", suffix or "") else ""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32] + suffix


def cache_folder(cache_dir: Optional[str]) -> Path:
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot use cache_dir {folder}: {one_line(exc)}; pass a writable "
                         f"folder") from None
    return folder


def part_file(folder: Path, target: Path) -> tuple:
    """A unique temporary file next to `target`: concurrent downloads never share one."""
    try:
        return tempfile.mkstemp(dir=folder, prefix=target.name + ".", suffix=".part")
    except OSError as exc:
        raise InputError(f"cannot write to cache_dir {folder}: {one_line(exc)}; pass a "
                         f"writable folder") from None


def download(url: str, cache_dir: Optional[str], timeout: float, progress: bool) -> Path:
    """Fetch `url` into the cache once. The body goes to a unique .part file that is renamed
    only when complete, so a failed or concurrent download never leaves a truncated cache file."""
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    target = folder / cache_name(url, os.path.splitext(urlparse(url).path)[1])
    if target.is_file():
        return target
    handle, part = part_file(cache_folder(cache_dir), target)
    try:
        with os.fdopen(handle, "wb") as out, _http_errors(url, timeout), \
                _http_get(url, timeout) as response:
            received = _stream_to(response, out, url, progress)
            _check_complete(response, received, url)
        os.replace(part, target)
    except BaseException:  # also Ctrl-C: never keep a partial file
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    return target


def _stream_to(response: requests.Response, out: Any, url: str, progress: bool) -> int:
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    name = os.path.basename(urlparse(url).path) or url
    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {name}",
              file=sys.stderr, disable=not progress, leave=False) as bar:
        for chunk in response.iter_content(chunk_size=1 << 20):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received
