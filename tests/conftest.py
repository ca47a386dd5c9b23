"""Shared test fixtures: local HTTP(S) servers and generated media. No network, CPU only.

Servers (function-scoped; one fresh server per test):
    http_server    -> LocalServer: `.url` base URL ("http://127.0.0.1:PORT", no trailing slash),
                      `.root` (Path) folder it serves (drop files there), `.hits` list of request
                      paths received, `.count(name)` requests for one file name, `.url_for(name)`.
                      Special routes, all serving a file of `.root`:
                        /__drop__/<name>  sends the headers (full Content-Length) and half the body,
                                          then closes the connection (an interrupted download)
                        /__slow__/<name>  waits `.slow_s` seconds (default 2) before answering
                        /__status__/<code> answers that HTTP status with an empty body
                        /__drip__/<name>  sends the headers (full Content-Length), then one byte
                                          every `.drip_s` seconds (default 1): a server that never
                                          stalls long enough for a per-read timeout
                      Missing files get 404. HEAD answers the status and headers of a GET (the CLI
                      probes URLs before loading the model); `.hits` counts GETs only.
    https_server   -> the same over TLS with a throw-away self-signed certificate; `.ca_path` is its
                      PEM. The fixture sets REQUESTS_CA_BUNDLE to it for this test only, so
                      `requests` verifies the server normally (no verify=False anywhere).
    tls_cert       -> (cert_pem_path, key_pem_path), session-scoped, for 127.0.0.1 / localhost.

Media (files are generated with PIL / PyAV):
    sample_image_path  PNG, RGB, 100x80, a colour gradient with a dark square
    sample_jpeg_path   JPEG, RGB, 120x90
    rgba_image_path    PNG, RGBA, 64x64, left half opaque red, right half fully transparent
    sample_video_spec  VideoSpec(width=112, height=84, fps=30, frames=90): what sample_video_path is
    sample_video_path  H.264 MP4 (session-scoped; don't modify): 112x84, 30 fps, 3 s = 90 frames,
                       a white square moving left to right and a background that brightens over
                       time, so any two frames differ
    make_video         factory make_video(path, frames=90, fps=30, width=112, height=84) -> Path
    make_image         factory make_image(path, width=100, height=80, mode="RGB") -> Path (format
                       from the suffix)
    corrupt_video_path 4 KiB of random bytes named broken.mp4
    truncated_video_path the first 3000 bytes of sample_video_path (no moov atom: cannot open)
    frames_dir         folder with 5 PNG frames frame_000.png .. frame_004.png, 112x84, each
                       different (odd count on purpose: the loader pads to an even count)

Model:
    tiny_model_dir     a tiny random Qwen2.5-VL in the official layout (session-scoped), made by
                       qwen_vl_psa/tiny_checkpoint.py, the tool users run; tests load it through
                       `--model DIR` / QwenVLInference(DIR) like any downloaded checkpoint
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import mimetypes
import socket
import ssl
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the checkout's package, also when it is not installed
    sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- servers


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        server.hits.append(self.path)
        path = unquote(urlparse(self.path).path)
        if path.startswith("/__status__/"):
            self.send_response(int(path.rsplit("/", 1)[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        drop = path.startswith("/__drop__/")
        drip = path.startswith("/__drip__/")
        if path.startswith("/__slow__/"):
            time.sleep(server.slow_s)
        if path.startswith(("/__drop__/", "/__slow__/", "/__drip__/")):
            path = path.split("/", 2)[2]
        file = server.root / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(file.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if drip:
            for i in range(len(data)):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(server.drip_s)
            return
        if drop:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802: the status and headers a GET would give, no body
        path = unquote(urlparse(self.path).path)
        if path.startswith("/__status__/"):
            self.send_response(int(path.rsplit("/", 1)[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith(("/__drop__/", "/__slow__/", "/__drip__/")):
            path = path.split("/", 2)[2]
        file = self.server.root / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(file.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(file.stat().st_size))
        self.end_headers()

    def log_message(self, *args):  # keep test output clean
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that timed out or a dropped connection is expected here, not a failure.
        pass


class LocalServer:
    def __init__(self, root: Path, context: ssl.SSLContext | None = None):
        self.root = root
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.root = root
        self._server.hits = []
        self._server.slow_s = 2.0
        self._server.drip_s = 1.0
        if context is not None:
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self.ca_path: Path | None = None
        # A short poll interval makes shutdown() quick (the default 0.5 s per test adds up).
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()

    @property
    def hits(self) -> list:
        return self._server.hits

    @property
    def slow_s(self) -> float:
        return self._server.slow_s

    @slow_s.setter
    def slow_s(self, value: float) -> None:
        self._server.slow_s = value

    @property
    def drip_s(self) -> float:
        return self._server.drip_s

    @drip_s.setter
    def drip_s(self, value: float) -> None:
        self._server.drip_s = value

    def url_for(self, name: str) -> str:
        return f"{self.url}/{name}"

    def count(self, name: str) -> int:
        return sum(1 for hit in self.hits if unquote(urlparse(hit).path).rsplit("/", 1)[-1] == name)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def http_server(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")  # never route the test server via a proxy
    root = tmp_path / "http_root"
    root.mkdir()
    server = LocalServer(root)
    yield server
    server.close()


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())  # EC: instant, unlike RSA key generation
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qwen-vl test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        # A self-signed leaf that is also its own CA, so it can be the whole trust bundle.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def https_server(tmp_path, monkeypatch, tls_cert):
    cert_path, key_path = tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_path))  # trust it for this test only
    root = tmp_path / "https_root"
    root.mkdir()
    server = LocalServer(root, context)
    server.ca_path = cert_path
    yield server
    server.close()


# ----------------------------------------------------------------------------- images


def _pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                    np.full_like(x, (seed * 37) % 256)], axis=-1).astype(np.uint8)
    img[height // 4: height // 2, width // 4: width // 2] = 20  # a dark square: a sharp edge
    return img


def _make_image(path, width=100, height=80, mode="RGB") -> Path:
    path = Path(path)
    image = Image.fromarray(_pattern(width, height)).convert(mode)
    image.save(path)
    return path


@pytest.fixture
def make_image():
    return _make_image


@pytest.fixture
def sample_image_path(tmp_path) -> Path:
    return _make_image(tmp_path / "sample.png", 100, 80)


@pytest.fixture
def sample_jpeg_path(tmp_path) -> Path:
    path = tmp_path / "sample.jpg"
    Image.fromarray(_pattern(120, 90)).save(path, quality=95)
    return path


@pytest.fixture
def rgba_image_path(tmp_path) -> Path:
    data = np.zeros((64, 64, 4), np.uint8)
    data[:, :32] = (255, 0, 0, 255)
    data[:, 32:] = (0, 0, 255, 0)  # fully transparent blue: must come out white
    path = tmp_path / "rgba.png"
    Image.fromarray(data, "RGBA").save(path)
    return path


# ----------------------------------------------------------------------------- videos


class VideoSpec(NamedTuple):
    width: int
    height: int
    fps: int
    frames: int


SAMPLE_VIDEO = VideoSpec(width=112, height=84, fps=30, frames=90)


def _video_frame(k: int, frames: int, width: int, height: int) -> np.ndarray:
    img = _pattern(width, height)
    img[..., 2] = k * 255 // max(frames - 1, 1)  # background brightens over time
    size = max(height // 4, 4)
    x = k * (width - size) // max(frames - 1, 1)  # a white square moves left to right
    img[height // 4: height // 4 + size, x: x + size] = 255
    return img


def _make_video(path, frames=90, fps=30, width=112, height=84) -> Path:
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(_video_frame(k, frames, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def make_video():
    return _make_video


@pytest.fixture(scope="session")
def sample_video_spec() -> VideoSpec:
    return SAMPLE_VIDEO


@pytest.fixture(scope="session")
def sample_video_path(tmp_path_factory) -> Path:
    spec = SAMPLE_VIDEO
    return _make_video(tmp_path_factory.mktemp("video") / "sample.mp4", spec.frames, spec.fps,
                       spec.width, spec.height)


@pytest.fixture
def corrupt_video_path(tmp_path) -> Path:
    path = tmp_path / "broken.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


@pytest.fixture
def truncated_video_path(tmp_path, sample_video_path) -> Path:
    path = tmp_path / "truncated.mp4"
    path.write_bytes(sample_video_path.read_bytes()[:3000])
    return path


@pytest.fixture
def frames_dir(tmp_path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for k in range(5):
        Image.fromarray(_video_frame(k, 5, 112, 84)).save(folder / f"frame_{k:03d}.png")
    return folder


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from qwen_vl_psa.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen2_5_vl")))


@pytest.fixture(scope="session")
def shared_model(tiny_model_dir):
    """The tiny checkpoint loaded once for the whole run (loading is most of a model test's time)."""
    from qwen_vl_psa.engine import QwenVLInference

    return QwenVLInference(tiny_model_dir, dtype="float32", verbose=False)


@pytest.fixture
def model(shared_model):
    """The shared model; each test starts with PSA off, whatever the test before it did."""
    shared_model.disable_psa()
    yield shared_model
    shared_model.disable_psa()
