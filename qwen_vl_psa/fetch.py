"""Downloads for media inputs: one fetch into a cache folder, never a truncated file, and
requests' errors turned into one-line MediaErrors that name the URL and the fix.

A download streams into a unique .part file next to its target (with a tqdm bar on stderr) and
is renamed only when complete, so a failure, a kill or a concurrent download of the same URL
never leaves a file that looks whole.

Time limits: `timeout` (--timeout, default 300 s) is the whole download's deadline; the server
must also answer and keep sending within STALL_S (30 s, or the timeout if shorter) and, once a
download has run RATE_WINDOW_S, deliver at least MIN_RATE bytes/s over the last window. A server
that drips one byte every few seconds fails there, not never.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlparse

import requests
import urllib3.exceptions
from tqdm import tqdm

from .errors import InputError, MediaError

DEFAULT_CACHE_DIR = os.path.join("model_cache", "media")  # relative to the working directory
HTTP_HEADERS = {"User-Agent": "qwen2.5-vl-paddle/1.0"}  # some hosts refuse requests' default agent
DEFAULT_TIMEOUT = 300.0  # seconds for one whole download (--timeout)
STALL_S = 30.0  # to connect, and most seconds without a byte
RATE_WINDOW_S = 30.0  # the minimum rate is measured over this many seconds
MIN_RATE = 1024  # bytes per second
READ_SIZE = 1 << 16
STALE_PART_S = 600  # a .part file untouched this long was left by a killed run (live ones grow every 30 s)


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
        text = str(exc).lower()
        if any(k in text for k in ("wrong_version_number", "wrong version number", "record layer failure",
                                   "packet length too long", "http_request", "unexpected eof")):
            raise MediaError(f"cannot fetch {url}: the server does not speak TLS on that port (an https:// URL "
                             f"to a plain-http server?); try http:// or check the port") from None
        raise MediaError(f"cannot fetch {url}: TLS certificate check failed ({one_line(exc)}); "
                         f"set REQUESTS_CA_BUNDLE to a CA bundle that trusts the server") from None
    except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError):
        raise MediaError(f"cannot fetch {url}: no response within {min(timeout, STALL_S):g} s; check the URL "
                         f"and that the server is up (--timeout sets the whole download's limit)") from None
    except requests.exceptions.ConnectionError as exc:
        raise MediaError(f"cannot fetch {url}: connection failed ({_socket_reason(exc)}); "
                         f"check the URL and that the server is reachable") from None
    except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError,
            urllib3.exceptions.DecodeError) as exc:
        raise MediaError(f"cannot fetch {url}: download interrupted ({one_line(exc)}); "
                         f"try again") from None
    except requests.exceptions.RequestException as exc:
        raise MediaError(f"cannot fetch {url}: {one_line(exc)}; check the URL") from None


@contextlib.contextmanager
def _http_get(url: str, timeout: float) -> Iterator[requests.Response]:
    with requests.get(url, stream=True, timeout=min(timeout, STALL_S), headers=HTTP_HEADERS) as response:
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


def probe(url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """A HEAD request before the model loads, so a typo'd URL (404, 410) or an unreachable host
    fails in a second, not after minutes of loading. Statuses a server may give HEAD alone (405,
    501...) pass: the download itself decides then."""
    with _http_errors(url, timeout):
        response = requests.head(url, timeout=min(timeout, 10.0), headers=HTTP_HEADERS, allow_redirects=True)
        if response.status_code in (404, 410):
            raise MediaError(f"cannot fetch {url}: HTTP {response.status_code} {response.reason or ''}".rstrip()
                             + "; check the URL")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if response.ok and content_type in ("text/html", "application/xhtml+xml"):
            raise MediaError(f"cannot use {url}: the server answers with an HTML page ({content_type}), not an "
                             "image or a video; check the URL (a page that shows the media is not the media file)")


class _Pace:
    """The deadline and the minimum rate of one download; check() after every read."""

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self.start = time.monotonic()
        self.marks = collections.deque([(self.start, 0)])

    def check(self, received: int) -> None:
        now = time.monotonic()
        if now - self.start > self.timeout:
            raise MediaError(f"cannot fetch {self.url}: not complete after {self.timeout:g} s ({received} bytes "
                             f"so far); pass a larger --timeout (seconds; timeout= in Python), or download "
                             f"the file yourself and pass its path")
        self.marks.append((now, received))
        while len(self.marks) > 1 and now - self.marks[1][0] >= RATE_WINDOW_S:
            self.marks.popleft()
        t0, r0 = self.marks[0]
        if now - t0 >= RATE_WINDOW_S and (received - r0) / (now - t0) < MIN_RATE:
            raise MediaError(f"cannot fetch {self.url}: the server sent {received - r0} bytes in the last "
                             f"{now - t0:.0f} s (under {MIN_RATE} bytes/s); try again later, or download the "
                             f"file yourself and pass its path")

    def socket_timeout(self) -> float:
        """Each read waits at most until the deadline (and STALL_S)."""
        return max(0.05, min(STALL_S, self.timeout - (time.monotonic() - self.start)))


def _read_body(response: requests.Response, url: str, timeout: float, write, progress: bool) -> int:
    """Read the body in whatever pieces arrive (read1), checking the deadline and the rate after
    each, so a slow drip cannot hold a read forever. Returns the bytes received."""
    pace = _Pace(url, timeout)
    raw = response.raw
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    name = os.path.basename(urlparse(url).path) or url
    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {name}",
              file=sys.stderr, disable=not progress, leave=False) as bar:
        while True:
            _set_socket_timeout(raw, pace.socket_timeout())
            chunk = raw.read1(READ_SIZE, decode_content=True)
            if not chunk:
                break
            write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            pace.check(received)
    return received


def _set_socket_timeout(raw: Any, seconds: float) -> None:
    """Best effort: the open connection's socket waits no longer than the deadline allows."""
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(seconds)


def fetch_bytes(url: str, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    parts: list = []
    with _http_errors(url, timeout), _http_get(url, timeout) as response:
        received = _read_body(response, url, timeout, parts.append, progress=False)
        _check_complete(response, received, url)
        return b"".join(parts)


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


def user_mode() -> int:
    """The mode a new file gets under the user's umask (0o666 & ~umask), read without changing
    the umask (os.umask is process-wide and racy with threads): /proc/self/status on Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o644


def publish(part: str, target: Path) -> None:
    """Rename a finished temporary file into place with the user's umask (mkstemp makes 0600)."""
    with contextlib.suppress(OSError):
        os.chmod(part, user_mode())
    os.replace(part, target)


def clean_stale_parts(folder: Path) -> None:
    """Remove .part files that killed runs left behind (untouched for STALE_PART_S)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if entry.name.endswith(".part"):
                with contextlib.suppress(OSError):
                    if now - entry.stat().st_mtime > STALE_PART_S:
                        os.unlink(entry.path)


def part_file(folder: Path, target: Path) -> tuple:
    """A unique temporary file next to `target`: concurrent downloads never share one."""
    try:
        return tempfile.mkstemp(dir=folder, prefix=target.name + ".", suffix=".part")
    except OSError as exc:
        raise InputError(f"cannot write to cache_dir {folder}: {one_line(exc)}; pass a "
                         f"writable folder") from None


def download(url: str, cache_dir: Optional[str], timeout: float, progress: bool,
             check: Optional[Callable[[Path], Optional[str]]] = None, what: str = "media") -> Path:
    """Fetch `url` into the cache once. The body goes to a unique .part file that is renamed
    only when complete, so a failed or concurrent download never leaves a truncated cache file.

    check(path) -> None when the file decodes as the expected media, else the reason: a body
    that fails it (an HTML error page at a .jpg URL) is never cached, and a cached file that
    fails it (written by an older version, or damaged) is dropped and fetched once more."""
    folder = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR)
    target = folder / cache_name(url, os.path.splitext(urlparse(url).path)[1])
    if target.is_file():
        if check is None or check(target) is None:
            return target
        with contextlib.suppress(OSError):
            target.unlink()  # a cached file that no longer decodes: fetch it again
    folder = cache_folder(cache_dir)
    clean_stale_parts(folder)
    handle, part = part_file(folder, target)
    try:
        with os.fdopen(handle, "wb") as out, _http_errors(url, timeout), \
                _http_get(url, timeout) as response:
            received = _read_body(response, url, timeout, out.write, progress)
            _check_complete(response, received, url)
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip() or "no Content-Type"
        problem = check(Path(part)) if check is not None else None
        if problem is not None:
            problem = problem.replace(f": '{part}'", "").replace(str(part), "the download")
            with open(part, "rb") as f:
                head = f.read(1024).lstrip().lower()
            sent = (f"an HTML page ({received} bytes, {content_type})" if head.startswith((b"<!doctype", b"<html"))
                    or b"<html" in head else f"{received} bytes of {content_type}")
            raise MediaError(f"cannot use {url}: the server sent {sent}, not {what} ({problem}); check the "
                             f"URL (nothing was cached)")
        publish(part, target)
    except BaseException:  # also Ctrl-C: never keep a partial file
        with contextlib.suppress(OSError):
            os.unlink(part)
        raise
    return target
