"""Media named in server requests: fetched with limits, never from the server's own files unless the
operator allowed a folder.

A client of the server is not its operator, so the engine's own loaders (which read any local path
or file:// URL and follow any redirect) are not given client URLs. This module turns a URL from a
request into bytes, or into a local path under --allowed-local-media-path, and the server hands the
engine only those:

    fetch_media(url, limits) -> Fetched(data=bytes | None, path=str | None, label=str)

- data: URIs (base64) are decoded here;
- http(s) URLs are fetched with a size limit, a total time limit and at most MAX_REDIRECTS
  redirects, each of which must stay on http or https;
- file:// URLs and bare paths are refused unless limits.allowed_local_dir is set and the resolved
  path (symlinks followed) lies inside it;
- every other scheme is refused.

Failures raise MediaRequestError with the HTTP status the server answers: 400 for what the client
can fix (bad base64, a refused scheme or path, too large), 502 when the remote server fails, 504
when it does not answer in time.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import time
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urljoin, urlparse

from .errors import QwenVLError

MAX_REDIRECTS = 5
HTTP_HEADERS = {"User-Agent": "qwen2.5-vl-paddle-server/1.0"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


class MediaRequestError(QwenVLError):
    """Media of a request that cannot be had; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_media"):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class MediaLimits:
    max_bytes: int = 256 << 20  # one image or video
    timeout_s: float = 30.0  # a whole download, redirects included
    allowed_local_dir: Optional[str] = None  # None: no local files at all


@dataclass
class Fetched:
    label: str  # how messages name it: the URL, a shortened data URI, the path
    data: Optional[bytes] = None  # the bytes (data URI, http)
    path: Optional[str] = None  # or a local path the operator allowed


def describe(url: str) -> str:
    return f"{url[:40]}...({len(url)} chars)" if url.startswith("data:") and len(url) > 60 else url


def fetch_media(url: str, limits: MediaLimits) -> Fetched:
    if not isinstance(url, str) or not url.strip():
        raise MediaRequestError("a media part has an empty url; give an http(s) URL or a data: URI")
    url = url.strip()
    label = describe(url)
    kind = source_kind(url)
    if kind == "data":
        data = decode_data_uri(url, label)
        _check_size(len(data), limits, label)
        return Fetched(label, data=data)
    if kind == "http":
        return Fetched(label, data=fetch_http(url, limits))
    return Fetched(label, path=local_path(url, limits))


def source_kind(url: str) -> str:
    """ "data", "http" (http and https) or "local" (file:// or a path); other schemes are refused."""
    url = url.strip()
    if url.startswith("data:"):
        return "data"
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match and not re.match(r"^[A-Za-z]:[\\/]", url) else None
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file" or scheme is None:
        return "local"
    raise MediaRequestError(f"unsupported URL scheme {scheme}: in {describe(url)}; use an http(s) URL or a data: URI",
                            code="unsupported_url_scheme")


def decode_data_uri(uri: str, label: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise MediaRequestError(f"unsupported data URI {label}: only base64 data URIs "
                                "(data:<type>;base64,<data>) are supported")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaRequestError(f"invalid base64 in data URI {label}: {exc}; re-encode the file") from None


def local_path(url: str, limits: MediaLimits) -> str:
    """The real path of a file:// URL or bare path, if it lies in the allowed folder."""
    if limits.allowed_local_dir is None:
        raise MediaRequestError(
            f"local files cannot be read through the server ({describe(url)}): send the media as an http(s) URL "
            "or a data: URI, or start the server with --allowed-local-media-path DIR",
            code="local_media_forbidden")
    raw = url
    if url.lower().startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaRequestError(f"file URL {url} names another host; use file:///absolute/path",
                                    code="local_media_forbidden")
        raw = unquote(parsed.path)
    root = os.path.realpath(limits.allowed_local_dir)
    path = os.path.realpath(os.path.join(root, os.path.expanduser(raw)))
    if os.path.commonpath([root, path]) != root:
        raise MediaRequestError(f"{url} is outside the allowed media folder {limits.allowed_local_dir}",
                                code="local_media_forbidden")
    if not os.path.exists(path):
        raise MediaRequestError(f"media file not found: {url}; check the path", status=400,
                                code="media_not_found")
    if os.path.isfile(path):
        _check_size(os.path.getsize(path), limits, url)
    return path


def fetch_http(url: str, limits: MediaLimits) -> bytes:
    """GET with redirects followed by hand (each must stay on http/https), a size cap and a deadline."""
    import requests  # the model stack's dependency; imported here to keep `serve --help` fast

    deadline = time.monotonic() + limits.timeout_s
    current = url
    with requests.Session() as session:
        for _ in range(MAX_REDIRECTS + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise _timeout(url, limits)
            try:
                with session.get(current, stream=True, allow_redirects=False, timeout=left,
                                 headers=HTTP_HEADERS) as response:
                    if response.is_redirect:
                        target = urljoin(current, response.headers.get("Location", ""))
                        scheme = urlparse(target).scheme.lower()
                        if scheme not in ("http", "https"):
                            raise MediaRequestError(
                                f"cannot fetch {url}: it redirects to {describe(target)}, and only http(s) "
                                "redirects are followed", code="redirect_refused")
                        current = target
                        continue
                    if response.status_code >= 400:
                        raise MediaRequestError(f"cannot fetch {url}: HTTP {response.status_code} "
                                                f"{response.reason or ''}".rstrip() + "; check the URL",
                                                status=502, code="media_fetch_failed")
                    return _read_body(response, url, limits, deadline)
            except requests.exceptions.Timeout:
                raise _timeout(url, limits) from None
            except requests.exceptions.RequestException as exc:
                raise MediaRequestError(f"cannot fetch {url}: {_one_line(exc)}; check the URL and that the "
                                        "server is reachable", status=502, code="media_fetch_failed") from None
    raise MediaRequestError(f"cannot fetch {url}: more than {MAX_REDIRECTS} redirects", status=502,
                            code="media_fetch_failed")


def _read_body(response, url: str, limits: MediaLimits, deadline: float) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.isdigit():
        _check_size(int(length), limits, url)
    chunks, received = [], 0
    for chunk in response.iter_content(chunk_size=1 << 16):
        received += len(chunk)
        _check_size(received, limits, url)
        if time.monotonic() > deadline:
            raise _timeout(url, limits)
        chunks.append(chunk)
    data = b"".join(chunks)
    if length and length.isdigit() and not response.headers.get("Content-Encoding") and len(data) != int(length):
        raise MediaRequestError(f"cannot fetch {url}: download incomplete ({len(data)} of {length} bytes); try again",
                                status=502, code="media_fetch_failed")
    return data


def _check_size(n: int, limits: MediaLimits, label: str):
    if n > limits.max_bytes:
        raise MediaRequestError(f"{label} is over the server's media size limit of {limits.max_bytes >> 20} MiB "
                                "(--max-media-mb)", code="media_too_large")


def _timeout(url: str, limits: MediaLimits) -> MediaRequestError:
    return MediaRequestError(f"cannot fetch {url}: no complete response within {limits.timeout_s:g} s "
                             "(--media-timeout); check the URL", status=504, code="media_fetch_timeout")


def _one_line(exc: BaseException) -> str:
    match = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(exc))
    if match:
        return match.group(0).strip()
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
