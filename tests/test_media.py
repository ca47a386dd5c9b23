"""media.py: every input kind, Qwen2.5-VL sampling / resize rules, both decoders, every error.

CPU only, no network (local HTTP(S) servers from conftest.py), a few seconds in all.
"""

from __future__ import annotations

import base64
import socket
import sys

import numpy as np
import paddle
import pytest
from paddleformers.transformers.paddle_vision_utils import resize as paddle_resize
from paddleformers.transformers.qwen2_vl import vision_process as vp
from PIL import Image

from qwen_vl_psa import media
from qwen_vl_psa.errors import InputError, MediaError, MediaNotFoundError

VIDEO_MIN = 128 * 28 * 28
VIDEO_MAX = 768 * 28 * 28


def _data_uri(path, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _reference_image(src):
    """paddleformers' own fetch_image: the reference for sizes and pixels."""
    return np.asarray(vp.fetch_image({"image": src}))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reference_video_size(height, width, nframes, min_pixels=None, max_pixels=None,
                          total_pixels=None):
    """The frame size paddleformers' fetch_video computes, written out from its source."""
    min_pixels = VIDEO_MIN if min_pixels is None else min_pixels
    total_pixels = vp.MODEL_SEQ_LEN * 28 * 28 * 0.9 if total_pixels is None else total_pixels
    cap = max(min(VIDEO_MAX, total_pixels / nframes * 2), int(min_pixels * 1.05))
    cap = cap if max_pixels is None else min(max_pixels, cap)
    return vp.smart_resize(height, width, factor=28, min_pixels=min_pixels, max_pixels=cap)


# ----------------------------------------------------------------------------- images


def test_image_path_matches_reference(sample_image_path):
    image = media.load_image(sample_image_path)
    assert image.mode == "RGB"
    assert (image.height, image.width) == vp.smart_resize(80, 100, factor=28,
                                                          min_pixels=4 * 784, max_pixels=16384 * 784)
    assert np.array_equal(np.asarray(image), _reference_image(str(sample_image_path)))


def test_image_jpeg_str_path(sample_jpeg_path):
    image = media.load_image(str(sample_jpeg_path))
    assert image.size[0] % 28 == 0 and image.size[1] % 28 == 0
    assert np.array_equal(np.asarray(image), _reference_image(str(sample_jpeg_path)))


def test_image_file_url(tmp_path, make_image):
    path = make_image(tmp_path / "with space.png")
    plain = media.load_image(path)
    for url in (f"file://{path}", f"file://{str(path).replace(' ', '%20')}"):
        assert np.array_equal(np.asarray(media.load_image(url)), np.asarray(plain))


def test_image_data_uri(sample_image_path):
    image = media.load_image(_data_uri(sample_image_path))
    assert np.array_equal(np.asarray(image), np.asarray(media.load_image(sample_image_path)))


def test_image_pil_input_not_modified(sample_image_path):
    source = Image.open(sample_image_path)
    source.load()
    before = np.asarray(source).copy()
    image = media.load_image(source)
    assert np.array_equal(np.asarray(source), before)
    assert np.array_equal(np.asarray(image), _reference_image(source))


def test_image_alpha_over_white(rgba_image_path):
    image = np.asarray(media.load_image(rgba_image_path))
    assert image.shape == (56, 56, 3)  # 64 rounds to 56 (nearest multiple of 28)
    assert tuple(image[28, 5]) == (255, 0, 0)
    assert tuple(image[28, 50]) == (255, 255, 255)
    assert np.array_equal(image, _reference_image(str(rgba_image_path)))


def test_image_grayscale_and_palette(tmp_path, make_image):
    for mode in ("L", "P"):
        image = media.load_image(make_image(tmp_path / f"{mode}.png", mode=mode))
        assert image.mode == "RGB"


def test_image_pixel_limits(tmp_path, make_image):
    path = make_image(tmp_path / "big.png", 640, 480)
    small = media.load_image(path, max_pixels=28 * 28 * 20)
    assert small.width * small.height <= 28 * 28 * 20
    assert (small.height, small.width) == vp.smart_resize(480, 640, 28, 4 * 784, 20 * 784)
    big = media.load_image(path, min_pixels=28 * 28 * 1000)
    assert big.width * big.height >= 28 * 28 * 1000
    assert big.width % 28 == 0 and big.height % 28 == 0
    # A max below the default min (4 tokens) drops the min to one patch instead of failing.
    tiny = media.load_image(path, max_pixels=28 * 28 * 2)
    assert tiny.size == (28, 28)
    small_image = media.load_image(make_image(tmp_path / "s.png", 30, 30), max_pixels=28 * 28 * 3)
    assert small_image.size == (28, 28)


def test_image_http_and_cache(http_server, sample_image_path, tmp_path):
    (http_server.root / "a.png").write_bytes(sample_image_path.read_bytes())
    url = http_server.url_for("a.png")
    expected = np.asarray(media.load_image(sample_image_path))
    assert np.array_equal(np.asarray(media.load_image(url)), expected)
    assert http_server.count("a.png") == 1
    cache = tmp_path / "cache"
    media.load_image(url, cache_dir=cache)
    again = media.load_image(url, cache_dir=cache)
    assert np.array_equal(np.asarray(again), expected)
    assert http_server.count("a.png") == 2  # the cached copy answered the third call
    assert [p.suffix for p in cache.iterdir()] == [".png"]


def test_image_https(https_server, sample_image_path):
    (https_server.root / "a.png").write_bytes(sample_image_path.read_bytes())
    image = media.load_image(https_server.url_for("a.png"))
    assert np.array_equal(np.asarray(image), np.asarray(media.load_image(sample_image_path)))


def test_https_untrusted_certificate(https_server, sample_image_path, monkeypatch):
    (https_server.root / "a.png").write_bytes(sample_image_path.read_bytes())
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    url = https_server.url_for("a.png")
    with pytest.raises(MediaError, match="certificate") as err:
        media.load_image(url)
    assert url in str(err.value)


# ----------------------------------------------------------------------------- image errors


def test_image_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(MediaNotFoundError) as err:
        media.load_image(path)
    assert str(path) in str(err.value)
    with pytest.raises(FileNotFoundError):  # the built-in type callers may catch
        media.load_image(f"file://{path}")


def test_image_corrupt_file(tmp_path, sample_image_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(MediaError, match="cannot decode image") as err:
        media.load_image(path)
    assert str(path) in str(err.value)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(sample_image_path.read_bytes()[:200])
    with pytest.raises(MediaError, match="truncated.png"):
        media.load_image(truncated)


def test_image_bad_inputs(tmp_path):
    with pytest.raises(MediaError, match="is a folder"):
        media.load_image(tmp_path)
    with pytest.raises(MediaError, match="ftp://host/a.png"):
        media.load_image("ftp://host/a.png")
    with pytest.raises(InputError, match="int"):
        media.load_image(42)
    with pytest.raises(MediaError, match="base64"):
        media.load_image("data:image/png;base64,@@not base64@@")
    with pytest.raises(MediaError, match="only base64"):
        media.load_image("data:image/svg+xml,<svg></svg>")
    with pytest.raises(MediaError, match="cannot decode image data:image/png.*unknown image format"):
        media.load_image("data:image/png;base64," + base64.b64encode(b"x" * 100).decode())


@pytest.mark.parametrize("kwargs, text", [
    ({"max_pixels": 28 * 28 - 1}, "max_pixels"),
    ({"max_pixels": 0}, "max_pixels"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels=5000"),
    ({"min_pixels": -1}, "min_pixels"),
    ({"min_pixels": 20000 * 784}, "min_pixels"),
    ({"timeout": 0}, "timeout"),
])
def test_image_bad_limits(sample_image_path, kwargs, text):
    with pytest.raises(InputError, match=text):
        media.load_image(sample_image_path, **kwargs)


def test_image_aspect_ratio(tmp_path, make_image):
    path = make_image(tmp_path / "thin.png", 1000, 4)
    with pytest.raises(MediaError, match="aspect ratio") as err:
        media.load_image(path)
    assert str(path) in str(err.value)
    pil = Image.new("RGB", (4, 1000))
    with pytest.raises(MediaError, match="PIL image 4x1000"):
        media.load_image(pil)


def test_image_too_elongated_for_max_pixels(tmp_path, make_image):
    path = make_image(tmp_path / "strip.png", 4200, 28)
    with pytest.raises(MediaError, match="within max_pixels=7840 .*raise max_pixels"):
        media.load_image(path, max_pixels=784 * 10)


def test_image_http_errors(http_server, sample_image_path):
    (http_server.root / "a.png").write_bytes(sample_image_path.read_bytes())
    missing = http_server.url_for("missing.png")
    with pytest.raises(MediaError, match="404") as err:
        media.load_image(missing)
    assert missing in str(err.value)
    with pytest.raises(MediaError, match="HTTP 500"):
        media.load_image(http_server.url_for("__status__/500"))
    http_server.slow_s = 1.0
    slow = http_server.url_for("__slow__/a.png")
    with pytest.raises(MediaError, match="no response within 0.2 s") as err:
        media.load_image(slow, timeout=0.2)
    assert slow in str(err.value)
    refused = f"http://127.0.0.1:{_free_port()}/a.png"
    with pytest.raises(MediaError, match=r"connection failed \(\[Errno 111\] Connection refused\)") as err:
        media.load_image(refused)
    assert refused in str(err.value)
    with pytest.raises(MediaError, match="__drop__/a.png: download interrupted"):
        media.load_image(http_server.url_for("__drop__/a.png"))


# ----------------------------------------------------------------------------- video sampling


@pytest.mark.parametrize("fps, nframes", [(0.5, 4), (1.0, 4), (2.0, 6), (4.0, 12)])
def test_video_sampling_counts(sample_video_path, sample_video_spec, fps, nframes):
    spec = sample_video_spec
    video = media.load_video(sample_video_path, fps=fps, progress=False)
    assert nframes == vp.smart_nframes({"fps": fps}, total_frames=spec.frames, video_fps=spec.fps)
    assert video.frames.shape[0] == nframes
    expected = paddle.linspace(0, spec.frames - 1, nframes).round().astype("int64").tolist()
    assert video.frame_indices == expected
    assert video.sample_fps == pytest.approx(nframes / spec.frames * spec.fps)
    assert video.source_fps == pytest.approx(spec.fps)
    assert video.total_frames == spec.frames
    assert video.duration_s == pytest.approx(spec.frames / spec.fps)
    assert set(video.timings) == {"fetch_s", "decode_s", "resize_s"}
    assert video.frames.dtype == np.uint8 and video.frames.shape[3] == 3


def test_video_frames_differ(sample_video_path):
    frames = media.load_video(sample_video_path, progress=False).frames.astype(int)
    for a, b in zip(frames[:-1], frames[1:]):
        assert np.abs(a - b).mean() > 5


@pytest.mark.parametrize("max_frames, nframes", [(4, 4), (5, 4), (10, 10), (1000, 90)])
def test_video_max_frames(sample_video_path, max_frames, nframes):
    video = media.load_video(sample_video_path, fps=30.0, max_frames=max_frames, progress=False)
    assert len(video.frames) == nframes
    assert nframes == vp.smart_nframes({"fps": 30.0, "max_frames": max_frames}, 90, 30)


def test_linspace_indices_match_paddle():
    cases = [(t, n) for t in (2, 3, 7, 10, 90, 91, 301, 1001) for n in range(2, min(t, 64) + 1, 2)]
    cases += [(141191, 584), (888898, 66), (50894, 432), (600001, 768)]  # float32 rounding cases
    for total, n in cases:
        expected = paddle.linspace(0, total - 1, n).round().astype("int64").tolist()
        assert media._linspace_indices(total - 1, n) == expected, (total, n)


def test_video_default_grid(sample_video_path, sample_video_spec):
    spec = sample_video_spec
    video = media.load_video(sample_video_path, progress=False)
    t, h, w, _ = video.frames.shape
    assert h % 28 == 0 and w % 28 == 0
    assert (h, w) == _reference_video_size(spec.height, spec.width, t)
    assert VIDEO_MIN <= h * w <= VIDEO_MAX


def test_video_pixel_limits(sample_video_path, monkeypatch):
    video = media.load_video(sample_video_path, max_pixels=28 * 28 * 20, progress=False)
    h, w = video.frames.shape[1:3]
    # A max below the default min (128 tokens) drops the min to one patch: no upscaling.
    assert (h, w) == (84, 112)
    video = media.load_video(sample_video_path, max_pixels=28 * 28 * 10, progress=False)
    h, w = video.frames.shape[1:3]
    assert (h, w) == vp.smart_resize(84, 112, 28, 28 * 28, 28 * 28 * 10)
    assert h * w <= 28 * 28 * 10
    video = media.load_video(sample_video_path, min_pixels=4 * 784, total_pixels=784 * 24,
                             progress=False)
    h, w = video.frames.shape[1:3]
    assert (h, w) == _reference_video_size(84, 112, 6, min_pixels=4 * 784, total_pixels=784 * 24)
    assert h * w <= 784 * 24 / 6 * 2
    big = media.load_video(sample_video_path, min_pixels=300 * 784, progress=False)
    assert big.frames.shape[1] * big.frames.shape[2] >= 300 * 784
    # The default total_pixels comes from paddleformers' MODEL_SEQ_LEN.
    monkeypatch.setattr(vp, "MODEL_SEQ_LEN", 200)
    video = media.load_video(sample_video_path, min_pixels=784, fps=30.0, progress=False)
    h, w = video.frames.shape[1:3]
    assert (h, w) == _reference_video_size(84, 112, 90, min_pixels=784) == (28, 56)
    monkeypatch.setattr(vp, "MODEL_SEQ_LEN", 60)  # 90 frames share too few pixels
    with pytest.raises(MediaError, match="total_pixels"):
        media.load_video(sample_video_path, min_pixels=784, fps=30.0, progress=False)


def test_video_resize_close_to_reference_paddle_resize(sample_video_path):
    video = media.load_video(sample_video_path, progress=False)
    import decord

    raw = decord.VideoReader(str(sample_video_path)).get_batch(video.frame_indices).asnumpy()
    h, w = video.frames.shape[1:3]
    ref = paddle_resize(paddle.to_tensor(raw.transpose(0, 3, 1, 2)), [h, w],
                        interpolation="bicubic", antialias=True)
    ref = ref.astype("float32").numpy().transpose(0, 2, 3, 1)
    diff = np.abs(video.frames.astype(np.float32) - ref)
    assert diff.max() <= 3 and diff.mean() < 0.1


# ----------------------------------------------------------------------------- decoders


def test_decord_and_pyav_agree(sample_video_path):
    a = media.load_video(sample_video_path, backend="decord", progress=False)
    b = media.load_video(sample_video_path, backend="pyav", progress=False)
    assert (a.backend, b.backend) == ("decord", "pyav")
    assert a.frame_indices == b.frame_indices and a.total_frames == b.total_frames
    assert a.source_fps == pytest.approx(b.source_fps)
    assert np.array_equal(a.frames, b.frames)


def test_pyav_fallback_when_decord_missing(sample_video_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    video = media.load_video(sample_video_path, progress=False)
    assert video.backend == "pyav" and len(video.frames) == 6
    with pytest.raises(MediaError, match="decord is not installed"):
        media.load_video(sample_video_path, backend="decord", progress=False)


def test_pyav_fallback_when_decord_fails(sample_video_path, monkeypatch):
    import decord

    def broken(*args, **kwargs):
        raise RuntimeError("simulated decord failure")

    monkeypatch.setattr(decord, "VideoReader", broken)
    video = media.load_video(sample_video_path, progress=False)
    assert video.backend == "pyav"
    assert np.array_equal(video.frames, media.load_video(sample_video_path, backend="pyav",
                                                         progress=False).frames)


def test_pyav_wrong_frame_count_in_container(sample_video_path, monkeypatch):
    # A container that claims more frames than it holds: PyAV resamples from the real count.
    real = media._pyav_frames
    calls = []

    def short_first(path, indices):
        calls.append(list(indices))
        return (None, 90) if len(calls) == 1 else real(path, indices)

    monkeypatch.setattr(media, "_pyav_frames", short_first)
    video = media.load_video(sample_video_path, backend="pyav", progress=False)
    assert len(calls) == 2 and video.total_frames == 90 and len(video.frames) == 6


# ----------------------------------------------------------------------------- video sources


def test_video_file_url(sample_video_path):
    a = media.load_video(f"file://{sample_video_path}", progress=False)
    b = media.load_video(str(sample_video_path), progress=False)
    assert np.array_equal(a.frames, b.frames)


def test_video_http_cached(http_server, sample_video_path, tmp_path, capsys):
    (http_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    url = http_server.url_for("clip.mp4")
    cache = tmp_path / "cache"
    first = media.load_video(url, cache_dir=cache, progress=True)
    assert "download clip.mp4" in capsys.readouterr().err  # the progress bar goes to stderr
    second = media.load_video(url, cache_dir=cache, progress=False)
    assert http_server.count("clip.mp4") == 1  # the second call used the cache
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".mp4"
    assert files[0].read_bytes() == sample_video_path.read_bytes()
    local = media.load_video(sample_video_path, progress=False)
    assert np.array_equal(first.frames, local.frames) and np.array_equal(second.frames, local.frames)
    assert first.timings["fetch_s"] > 0


def test_video_https(https_server, sample_video_path, tmp_path):
    (https_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    video = media.load_video(https_server.url_for("clip.mp4"), cache_dir=tmp_path / "c",
                             progress=False)
    assert np.array_equal(video.frames, media.load_video(sample_video_path, progress=False).frames)


def test_video_default_cache_dir(http_server, sample_video_path, tmp_path, monkeypatch):
    (http_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    monkeypatch.chdir(tmp_path)
    media.load_video(http_server.url_for("clip.mp4"), progress=False)
    assert len(list((tmp_path / "model_cache" / "media").glob("*.mp4"))) == 1


def test_bad_cache_dir(http_server, sample_video_path, tmp_path):
    (http_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="cache_dir"):
        media.load_video(http_server.url_for("clip.mp4"), cache_dir=blocker / "sub", progress=False)


def test_video_data_uri(sample_video_path, tmp_path):
    uri = _data_uri(sample_video_path, "video/mp4")
    video = media.load_video(uri, cache_dir=tmp_path / "c", progress=False)
    assert np.array_equal(video.frames, media.load_video(sample_video_path, progress=False).frames)


@pytest.mark.parametrize("route, text", [("missing.mp4", "404"), ("__drop__/clip.mp4", "interrupted"),
                                         ("__status__/503", "HTTP 503")])
def test_video_http_failure_leaves_no_file(http_server, sample_video_path, tmp_path, route, text):
    (http_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    cache = tmp_path / "cache"
    url = http_server.url_for(route)
    with pytest.raises(MediaError, match=text) as err:
        media.load_video(url, cache_dir=cache, progress=False)
    assert url in str(err.value)
    assert list(cache.iterdir()) == []  # no .part, no truncated file
    # The server is fine: the same file downloads in full afterwards.
    media.load_video(http_server.url_for("clip.mp4"), cache_dir=cache, progress=False)
    assert len(list(cache.iterdir())) == 1


def test_video_http_timeout_and_refused(http_server, sample_video_path, tmp_path):
    (http_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    http_server.slow_s = 1.0
    with pytest.raises(MediaError, match="no response"):
        media.load_video(http_server.url_for("__slow__/clip.mp4"), cache_dir=tmp_path,
                         timeout=0.2, progress=False)
    refused = f"http://127.0.0.1:{_free_port()}/clip.mp4"
    with pytest.raises(MediaError, match="connection failed") as err:
        media.load_video(refused, cache_dir=tmp_path, progress=False)
    assert refused in str(err.value)
    assert list(tmp_path.glob("*.part")) == []


# ----------------------------------------------------------------------------- frame folders


def test_frame_folder(frames_dir):
    video = media.load_video(frames_dir, fps=2.0, progress=False)
    assert video.backend == "frames"
    assert video.frames.shape[0] == 6  # 5 frames padded to even with the last one
    assert video.frame_indices == [0, 1, 2, 3, 4, 4]
    assert np.array_equal(video.frames[4], video.frames[5])
    assert video.total_frames == 5 and video.sample_fps == 2.0 and video.source_fps == 2.0
    assert video.duration_s == pytest.approx(2.5)
    h, w = video.frames.shape[1:3]
    assert (h, w) == _reference_video_size(84, 112, 6)
    # The reference for a frame list: each frame through fetch_image (factor 28), pad to even,
    # then the video resize. paddleformers' fetch_video itself passes 28 where fetch_image wants
    # the patch size 14 (so it rounds frames to multiples of 56): that slip is not reproduced.
    files = sorted(str(p) for p in frames_dir.iterdir())
    first = [np.asarray(vp.fetch_image({"image": f}, image_patch_size=14)) for f in files]
    stacked = np.stack(first + first[-1:]).transpose(0, 3, 1, 2)
    ref = paddle_resize(paddle.to_tensor(stacked), [h, w], interpolation="bicubic", antialias=True)
    ref = ref.astype("float32").numpy().transpose(0, 2, 3, 1)
    assert ref.shape == video.frames.shape
    assert np.abs(ref - video.frames.astype(np.float32)).max() <= 3


def test_frame_folder_natural_order_and_non_images(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for n in (1, 2, 10):
        Image.new("RGB", (56, 56), (n * 20, 0, 0)).save(folder / f"frame_{n}.png")
    (folder / "notes.txt").write_text("not a frame")
    (folder / ".hidden.png").write_bytes(b"")
    video = media.load_video(folder, progress=False)
    reds = [int(frame[0, 0, 0]) for frame in video.frames]
    assert reds == [20, 40, 200, 200]


def test_frame_folder_max_frames(frames_dir):
    video = media.load_video(frames_dir, max_frames=2, progress=False)
    assert video.frame_indices == [0, 4] and video.total_frames == 5
    assert video.sample_fps == pytest.approx(2 / 5 * 2.0)


def test_frame_list_of_images(frames_dir):
    images = [Image.open(p) for p in sorted(frames_dir.iterdir())]
    from_list = media.load_video(images, progress=False)
    assert np.array_equal(from_list.frames, media.load_video(frames_dir, progress=False).frames)
    assert media.load_video([images[0]], progress=False).frames.shape[0] == 2


def test_frame_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MediaError, match="no image files") as err:
        media.load_video(empty, progress=False)
    assert str(empty) in str(err.value)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(MediaError, match="no image files"):
        media.load_video(empty, progress=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (56, 56)).save(mixed / "a.png")
    Image.new("RGB", (112, 56)).save(mixed / "b.png")
    with pytest.raises(MediaError, match="differ in size"):
        media.load_video(mixed, progress=False)
    with pytest.raises(MediaNotFoundError, match="nowhere"):
        media.load_video(tmp_path / "nowhere", progress=False)
    with pytest.raises(MediaError, match="frame list is empty"):
        media.load_video([], progress=False)


# ----------------------------------------------------------------------------- video errors


def test_video_missing(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(MediaNotFoundError) as err:
        media.load_video(path, progress=False)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_video_corrupt(corrupt_video_path, truncated_video_path, backend):
    for path in (corrupt_video_path, truncated_video_path):
        with pytest.raises(MediaError, match="is it a valid video file") as err:
            media.load_video(path, backend=backend, progress=False)
        message = str(err.value)
        assert message.startswith(f"cannot decode video {path}:") and "\n" not in message


def test_video_single_frame(tmp_path, make_video):
    path = make_video(tmp_path / "one.mp4", frames=1)
    for backend in ("decord", "pyav"):
        with pytest.raises(MediaError, match="1 frame") as err:
            media.load_video(path, backend=backend, progress=False)
        assert str(path) in str(err.value)


def test_video_two_frames_is_enough(tmp_path, make_video):
    video = media.load_video(make_video(tmp_path / "two.mp4", frames=2), progress=False)
    assert video.frame_indices == [0, 1]


@pytest.mark.parametrize("kwargs, text", [
    ({"fps": 0}, "fps"), ({"fps": -1.0}, "fps"), ({"fps": "2"}, "fps"), ({"fps": float("nan")}, "fps"),
    ({"max_frames": 1}, "max_frames"), ({"max_frames": 2.5}, "max_frames"),
    ({"backend": "opencv"}, "backend"),
    ({"max_pixels": 100}, "max_pixels"), ({"min_pixels": 9000, "max_pixels": 8000}, "min_pixels"),
    ({"total_pixels": 0}, "total_pixels"), ({"timeout": -1}, "timeout"),
])
def test_video_bad_arguments(sample_video_path, kwargs, text):
    with pytest.raises(InputError, match=text):
        media.load_video(sample_video_path, progress=False, **kwargs)


def test_video_bad_sources(sample_image_path):
    with pytest.raises(InputError, match="single image"):
        media.load_video(Image.open(sample_image_path), progress=False)
    with pytest.raises(InputError, match="dict"):
        media.load_video({"video": "x.mp4"}, progress=False)
    with pytest.raises(MediaError, match="s3://bucket/x.mp4"):
        media.load_video("s3://bucket/x.mp4", progress=False)


def test_video_aspect_ratio(tmp_path):
    folder = tmp_path / "thin"
    folder.mkdir()
    for k in range(2):
        Image.new("RGB", (1000, 4)).save(folder / f"{k}.png")
    with pytest.raises(MediaError, match="aspect ratio"):
        media.load_video(folder, progress=False)


def test_video_image_file_is_not_a_video(sample_image_path):
    with pytest.raises(MediaError) as err:
        media.load_video(sample_image_path, progress=False)
    assert str(sample_image_path) in str(err.value)


# ----------------------------------------------------------------------------- guess_media_type


def test_guess_media_type(tmp_path, sample_image_path):
    cases = {
        "a.jpg": "image", "A.PNG": "image", "x/y.webp": "image", "clip.mp4": "video",
        "clip.MOV": "video", "https://h/p/clip.mkv?x=1#t": "video", "http://h/a.jpeg": "image",
        "data:image/png;base64,AAAA": "image", "data:video/mp4;base64,AAAA": "video",
        "data:text/plain;base64,AAAA": None, "notes.txt": None, "noext": None,
        f"file://{tmp_path}": "video", str(tmp_path): "video", "file:///x/y.gif": "image",
    }
    for src, expected in cases.items():
        assert media.guess_media_type(src) == expected, src
    assert media.guess_media_type(tmp_path) == "video"
    assert media.guess_media_type(Image.new("RGB", (2, 2))) == "image"
    assert media.guess_media_type(sample_image_path) == "image"
    assert media.guess_media_type([sample_image_path]) == "video"
    assert media.guess_media_type(3) is None
