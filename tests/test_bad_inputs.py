"""Big and bad inputs (issue 11): no crash, no hang, no stale cache, no silent truncation, and
the message names the real fix. CLI subprocesses for what users run, the API for the details."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer_qwen2_5_vl_psa.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def error_lines(stderr: str) -> list:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# ----------------------------------------------------------------------------- 1. big images on the CPU


def test_chunked_vision_attention_equals_eager():
    import paddle
    from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS

    from qwen_vl_psa.vision_attention import chunked_attention

    class Module(paddle.nn.Layer):
        num_key_value_groups = 1

    rng = np.random.default_rng(0)
    q, k, v = (paddle.to_tensor(rng.standard_normal((1, 4, 300, 16)).astype("float32")) for _ in range(3))
    module = Module()
    module.eval()
    want = ALL_ATTENTION_FUNCTIONS["eager"](module, q, k, v, scaling=0.25)[0]
    got, _ = chunked_attention(module, q, k, v, scaling=0.25, max_elements=4 * 300 * 7)  # 7 rows a block
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5)


def test_chunked_vision_encoder_equals_eager(model, make_image, tmp_path, monkeypatch):
    """The whole vision encoder with tiny blocks of rows gives the eager encoder's embeddings."""
    from qwen_vl_psa import vision_attention

    media = model.load_images([make_image(tmp_path / "a.png", 300, 200)])
    prompt = model.prompts.prepare(model.prompts.chat_text(media.with_question("hi")), media.processor_kwargs)
    model.prompts.encode_media(prompt)
    chunked = prompt.embeds.numpy()
    visual = model.model.visual if hasattr(model.model, "visual") else model.model.model.visual
    cfg = visual.blocks[0].attn.config
    assert cfg._attn_implementation == vision_attention.CHUNKED
    monkeypatch.setattr(vision_attention, "MAX_SCORE_ELEMENTS", 1000)  # force many blocks
    small = model.prompts.prepare(model.prompts.chat_text(media.with_question("hi")), media.processor_kwargs)
    model.prompts.encode_media(small)
    monkeypatch.setattr(cfg, "_attn_implementation", "eager")
    eager = model.prompts.prepare(model.prompts.chat_text(media.with_question("hi")), media.processor_kwargs)
    model.prompts.encode_media(eager)
    np.testing.assert_allclose(small.embeds.numpy(), eager.embeds.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(chunked, eager.embeds.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_phone_photo_answers_on_the_cpu_within_2gb(tiny_model_dir, tmp_path):
    """A 12-megapixel photo: one notice line naming --max-pixels, an answer, < 2 GB peak RSS."""
    import resource

    y, x = np.mgrid[0:3024, 0:4032]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    photo = tmp_path / "IMG_0001.jpg"
    Image.fromarray(pixels).save(photo, quality=85)
    del pixels, x, y
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = run_cli("--model", tiny_model_dir, "--input", photo, "--max-tokens", "3", "--cache-dir", tmp_path,
                "--json", timeout=240)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    notices = stats["notices"]  # --json: in the stats; otherwise one "notice:" line on stderr
    assert len(notices) == 1 and "--max-pixels" in notices[0] and "4032x3024" in notices[0], r.stderr
    assert stats["input_tokens"]["image"] <= 1280
    assert stats["peak_memory_mb"] < 2048
    child_peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert max(child_peak_kb, before) < 2 * 1024 * 1024


def test_too_big_for_memory_is_refused_before_allocating(model, make_image, tmp_path, monkeypatch):
    from qwen_vl_psa import cpu_limits
    from qwen_vl_psa.errors import InputError

    monkeypatch.setattr(cpu_limits, "available_bytes", lambda: 1 << 20)  # 1 MB free
    monkeypatch.setattr(model.prompts, "prepare", lambda *a, **k: pytest.fail("the processor ran"))
    with pytest.raises(InputError) as e:
        model.inference_image(make_image(tmp_path / "big.png", 1200, 900), "hi", max_pixels=1200 * 900)
    assert "--max-pixels" in str(e.value) and "\n" not in str(e.value)


def test_cpu_peak_memory_is_per_call(model, make_image, tmp_path):
    model.inference_image(make_image(tmp_path / "big.png", 1400, 1000), "hi", max_tokens=2)
    big = model.stats["peak_memory_mb"]
    model.inference_image(make_image(tmp_path / "small.png", 60, 60), "hi", max_tokens=2)
    assert model.stats["peak_memory_mb"] < big - 20


# ----------------------------------------------------------------------------- 4. checked before the model stack

_FAST = """
import sys, time
t = time.perf_counter()
from qwen_vl_psa.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("paddle", "paddleformers", "requests", "numpy") if m in sys.modules)
print("RESULT", rc, round(time.perf_counter() - t, 2), heavy)
"""


def run_fast(*args):
    r = subprocess.run([sys.executable, "-c", _FAST, *map(str, args)], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)
    rc, seconds, heavy = r.stdout.split("RESULT ", 1)[1].split(" ", 2)
    return int(rc), float(seconds), heavy.strip(), r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--input", "photo_typo.jpg"], ["not found", "photo_typo.jpg"]),
    (["--input", "http:///nohost.jpg"], ["malformed URL"]),
    (["--input", "gopher://x/a.jpg"], ["unsupported URL scheme"]),
    (["--type", "image", "--input", "tests"], ["folder", "--type video"]),
    (["--model", "./no_such_model", "--input", "README.md", "--type", "image"], ["--model", "no_such_model"]),
    (["--input", "README.md", "--type", "image", "--max-pixels", "100"], ["--max-pixels"]),
    (["--input", "README.md", "--type", "image", "--min-pixels", "5000", "--max-pixels", "1000"], ["--min-pixels"]),
    (["--input", "README.md", "--type", "video", "--max-frames", "1"], ["--max-frames"]),
    (["--input", "README.md", "--type", "image", "--prompts-file", "missing.txt"], ["--prompts-file"]),
    (["--batch", "missing.jsonl", "--output", "out.jsonl"], ["--batch", "not found"]),
])
def test_bad_arguments_fail_fast_without_the_model_stack(args, words):
    rc, seconds, heavy, stderr = run_fast(*args)
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1, stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert "paddle" not in heavy and "paddleformers" not in heavy, heavy
    assert seconds < 2.0


# ----------------------------------------------------------------------------- 8. an empty --prompts-file


@pytest.mark.slow
def test_empty_prompts_file_is_an_error(tmp_path, sample_image_path):
    empty = tmp_path / "questions.txt"
    empty.write_text("\n   \n\n")
    rc, _, heavy, stderr = run_fast("--input", sample_image_path, "--prompts-file", empty)
    assert rc == 2 and "has no questions" in error_lines(stderr)[0], stderr
    assert "paddle" not in heavy


# ----------------------------------------------------------------------------- 2. slow servers


@pytest.mark.slow
def test_drip_server_ends_at_the_timeout_with_one_line(tiny_model_dir, sample_image_path, http_server, tmp_path):
    """One byte a second never trips a per-read timeout; --timeout is the whole download's."""
    import time

    (http_server.root / "pic.png").write_bytes(sample_image_path.read_bytes())
    t0 = time.perf_counter()
    r = run_cli("--model", tiny_model_dir, "--input", http_server.url_for("__drip__/pic.png"), "--timeout", "3",
                "--cache-dir", tmp_path, "--max-tokens", "2", timeout=120)
    elapsed = time.perf_counter() - t0
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not complete after 3 s" in lines[0] and "--timeout" in lines[0]
    assert elapsed < 60
    assert list((tmp_path / "media").glob("*")) == []  # nothing partial left in the cache


def test_download_below_the_minimum_rate_fails(http_server, sample_image_path, tmp_path, monkeypatch):
    import time

    from qwen_vl_psa import fetch, media
    from qwen_vl_psa.errors import MediaError

    monkeypatch.setattr(fetch, "RATE_WINDOW_S", 1.0)
    (http_server.root / "pic.png").write_bytes(sample_image_path.read_bytes())
    http_server.drip_s = 0.2
    t0 = time.perf_counter()
    with pytest.raises(MediaError, match="bytes/s") as e:
        media.load_image(http_server.url_for("__drip__/pic.png"), timeout=600, cache_dir=tmp_path / "c")
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value)
    assert list((tmp_path / "c").glob("*")) == []


def test_corpus_stalled_item_fails_alone_and_blocks_nothing(model, sample_image_path, http_server, tmp_path):
    from qwen_vl_psa import corpus
    from qwen_vl_psa.cli import build_parser

    (http_server.root / "pic.png").write_bytes(sample_image_path.read_bytes())
    rows = [{"input": http_server.url_for("__drip__/pic.png"), "id": "stalled", "timeout": 3},
            {"input": str(sample_image_path), "id": "a"}, {"input": str(sample_image_path), "id": "b"}]
    batch = tmp_path / "in.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = build_parser().parse_args(["--batch", str(batch), "--output", str(out), "--max-tokens", "2",
                                      "--cache-dir", str(tmp_path / "c"), "--prefetch", "2"])
    assert corpus.run_batch(args, model=model) == 0
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "not complete after 3 s" in got["stalled"]["error"] and "--timeout" in got["stalled"]["error"]
    for key in ("a", "b"):  # answered while the stalled download was still running
        assert got[key]["answer"] is not None and got[key]["stats"]["prefetch"]["wait_s"] < 1.5


# ----------------------------------------------------------------------------- 3. nothing bad is cached

HTML = b"<!DOCTYPE html><html><body>Sign in to view this photo</body></html>\n"


@pytest.mark.slow
def test_html_at_a_jpg_url_is_not_cached(tiny_model_dir, sample_jpeg_path, http_server, tmp_path):
    (http_server.root / "pic.jpg").write_bytes(HTML)
    url = http_server.url_for("pic.jpg")
    r = run_cli("--model", tiny_model_dir, "--input", url, "--cache-dir", tmp_path, "--max-tokens", "2")
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "HTML page" in lines[0] and "nothing was cached" in lines[0]
    assert list((tmp_path / "media").glob("*")) == []
    (http_server.root / "pic.jpg").write_bytes(sample_jpeg_path.read_bytes())  # the server is fixed
    r = run_cli("--model", tiny_model_dir, "--input", url, "--cache-dir", tmp_path, "--max-tokens", "2")
    assert r.returncode == 0, r.stderr
    assert http_server.count("pic.jpg") == 2


def test_html_at_an_mp4_url_is_not_cached(sample_video_path, http_server, tmp_path):
    from qwen_vl_psa import media
    from qwen_vl_psa.errors import MediaError

    (http_server.root / "clip.mp4").write_bytes(HTML)
    url = http_server.url_for("clip.mp4")
    with pytest.raises(MediaError, match="HTML page.*a video"):
        media.load_video(url, cache_dir=tmp_path / "c", progress=False)
    assert list((tmp_path / "c").glob("*")) == []
    (http_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    assert media.load_video(url, cache_dir=tmp_path / "c", progress=False).frames.shape[0] > 0


def test_cached_file_that_no_longer_decodes_is_fetched_again(sample_jpeg_path, http_server, tmp_path):
    from qwen_vl_psa import media

    (http_server.root / "pic.jpg").write_bytes(sample_jpeg_path.read_bytes())
    url = http_server.url_for("pic.jpg")
    media.load_image(url, cache_dir=tmp_path / "c")
    [cached] = list((tmp_path / "c").glob("*.jpg"))
    cached.write_bytes(HTML)  # e.g. written by an older version that cached error pages
    assert media.load_image(url, cache_dir=tmp_path / "c").size[0] > 0
    assert http_server.count("pic.jpg") == 2 and cached.read_bytes() == sample_jpeg_path.read_bytes()


def test_stale_part_files_are_cleaned_and_cache_files_follow_the_umask(sample_jpeg_path, http_server, tmp_path):
    from qwen_vl_psa import media

    cache = tmp_path / "c"
    cache.mkdir()
    old, fresh = cache / "abc.jpg.x1.part", cache / "abc.jpg.x2.part"
    old.write_bytes(b"left by a killed run")
    fresh.write_bytes(b"another process is downloading")
    os.utime(old, (1e9, 1e9))
    (http_server.root / "pic.jpg").write_bytes(sample_jpeg_path.read_bytes())
    previous = os.umask(0o022)
    try:
        media.load_image(http_server.url_for("pic.jpg"), cache_dir=cache)
    finally:
        os.umask(previous)
    assert not old.exists() and fresh.exists()
    [cached] = list(cache.glob("*.jpg"))
    assert cached.stat().st_mode & 0o777 == 0o644


def test_merged_results_follow_the_umask(model, sample_image_path, tmp_path):
    from qwen_vl_psa import corpus
    from qwen_vl_psa.cli import build_parser

    batch = tmp_path / "in.txt"
    batch.write_text(f"{sample_image_path}\n")
    out = tmp_path / "out.jsonl"
    args = build_parser().parse_args(["--batch", str(batch), "--output", str(out), "--max-tokens", "2",
                                      "--cache-dir", str(tmp_path / "c")])
    previous = os.umask(0o022)
    try:
        assert corpus.run_batch(args, model=model) == 0
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- 6. images decoded right


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    from qwen_vl_psa import media

    ramp = np.linspace(0, 65535, 80 * 100).reshape(80, 100).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth16.png")
    assert Image.open(tmp_path / "depth16.png").mode.startswith("I")
    got = np.asarray(media.load_image(tmp_path / "depth16.png", max_pixels=100 * 80))
    assert abs(got.mean() - 127.5) < 3 and (got == 255).mean() < 0.05  # was 98% white


def test_exif_orientation_is_applied(tmp_path):
    from qwen_vl_psa import media

    stored = np.zeros((280, 560, 3), np.uint8)  # stored landscape, 560 wide
    stored[:, :280] = 255  # left half white
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait phone photo
    image.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    got = media.load_image(tmp_path / "portrait.jpg")
    assert got.size == (280, 560)  # upright: portrait
    top = np.asarray(got)[:200].mean()
    assert top > 200  # the stored left half is the displayed top after a 90 CW turn


@pytest.mark.slow
def test_animated_gif_says_only_the_first_frame_is_used(tiny_model_dir, tmp_path):
    frames = [Image.fromarray(np.full((60, 80, 3), 60 * i, np.uint8)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r = run_cli("--model", tiny_model_dir, "--input", tmp_path / "anim.gif", "--max-tokens", "2",
                "--cache-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    notices = [ln for ln in r.stderr.splitlines() if ln.startswith("notice:")]
    assert len(notices) == 1 and "3 frames" in notices[0] and "first frame" in notices[0], r.stderr


# ----------------------------------------------------------------------------- 7. truncated videos


def _faststart_video(path, seconds=10, fps=10):
    """Header (moov) first, as phones and web servers write them: a cut file still opens."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 112, 84, "yuv420p"
        for _ in range(seconds * fps):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8), format="rgb24")
            for packet in s.encode(frame):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


@pytest.mark.slow
def test_truncated_video_warns_with_both_durations(tiny_model_dir, tmp_path):
    full = _faststart_video(tmp_path / "full.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    r = run_cli("--model", tiny_model_dir, "--input", cut, "--max-tokens", "2", "--json", "--cache-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["container_duration_s"] == pytest.approx(10, abs=0.2)
    assert stats["video_duration_s"] < 5
    [notice] = stats["notices"]
    assert "10.0 s" in notice and "truncated" in notice
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("[")], r.stderr  # no decoder log lines
    whole = run_cli("--model", tiny_model_dir, "--input", full, "--max-tokens", "2", "--json", "--cache-dir", tmp_path)
    assert "notices" not in json.loads(whole.stdout)["stats"]


# ----------------------------------------------------------------------------- 9. messages that name the fix


def test_too_long_names_the_long_part(model, make_image, tmp_path, monkeypatch):
    from qwen_vl_psa.errors import InputError

    monkeypatch.setattr(model.prompts, "max_context", 120)
    with pytest.raises(InputError) as e:  # the text is long, the image small
        model.inference_image(make_image(tmp_path / "s.png", 56, 56), "why? " * 200, max_tokens=1)
    assert "shorten the prompt" in str(e.value) and "--fps" not in str(e.value)
    with pytest.raises(InputError) as e:  # the image is long
        model.inference_image(make_image(tmp_path / "b.png", 600, 400), "hi", max_tokens=1)
    assert "--max-pixels" in str(e.value) and "shorten" not in str(e.value)


def test_https_to_a_plain_http_port_is_not_a_certificate_problem(http_server):
    from qwen_vl_psa import media
    from qwen_vl_psa.errors import MediaError

    (http_server.root / "a.png").write_bytes(b"x")
    url = http_server.url_for("a.png").replace("http://", "https://")
    with pytest.raises(MediaError) as e:
        media.load_image(url, timeout=10)
    assert "does not speak TLS" in str(e.value) and "http://" in str(e.value)
    assert "certificate" not in str(e.value) and "REQUESTS_CA_BUNDLE" not in str(e.value)


@pytest.mark.slow
def test_argparse_errors_are_one_line():
    for args in (["--fps", "abc"], ["--bogus"], ["--hub", "nowhere"]):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "infer_qwen2_5_vl_psa.py"), *args],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr


@pytest.mark.slow
def test_no_decoder_log_lines_before_the_error(tiny_model_dir, corrupt_video_path, tmp_path):
    r = run_cli("--model", tiny_model_dir, "--input", corrupt_video_path, "--cache-dir", tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "broken.mp4" in lines[0], r.stderr


def test_hub_without_network_is_one_sentence():
    from qwen_vl_psa.loading import hub_download_message

    class LocalEntryNotFoundError(Exception):
        pass

    exc = LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\nAn error happened "
                                  "while trying to locate the files on the Hub, and we cannot find the "
                                  "appropriate snapshot folder for the specified revision on the local disk.")
    msg = hub_download_message("Qwen/Qwen2.5-VL-3B-Instruct", "huggingface", exc)
    assert "\n" not in msg and "cannot be reached ([Errno -2] Name or service not known)" in msg
    assert msg.endswith("--model")


# ----------------------------------------------------------------------------- 10. stats and side effects


def test_answer_is_terminal_safe_only_on_a_terminal(monkeypatch):
    import io

    from qwen_vl_psa import report

    class Tty(io.StringIO):
        def isatty(self):
            return True

    raw = "red \x1b[31mALERT\x1b]0;pwned\x07 done\tok\nnext\x9b2J"
    tty, pipe = Tty(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", tty)
    report.write_answer(raw)
    assert tty.getvalue() == "red [31mALERT]0;pwned done\tok\nnext2J"  # no ESC, BEL or CSI left
    monkeypatch.setattr(sys, "stdout", pipe)
    report.write_answer(raw)
    assert pipe.getvalue() == raw  # a pipe or file gets the raw text


@pytest.mark.slow
def test_ttft_is_reported_with_and_without_media_loading(tiny_model_dir, sample_video_path, tmp_path):
    r = run_cli("--model", tiny_model_dir, "--input", sample_video_path, "--max-tokens", "2", "--cache-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "after the media were loaded" in r.stderr and "with fetch and decode" in r.stderr


def test_log_folder_is_ignored():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "log/" in f.read().split()


def test_chunked_causal_prefill_equals_sdpa():
    import paddle
    from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS

    from qwen_vl_psa.vision_attention import causal_chunked

    class Module(paddle.nn.Layer):
        pass

    rng = np.random.default_rng(1)
    q = paddle.to_tensor(rng.standard_normal((1, 4, 200, 16)).astype("float32"))
    k, v = (paddle.to_tensor(rng.standard_normal((1, 2, 200, 16)).astype("float32")) for _ in range(2))
    module = Module()
    module.eval()
    want = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, attention_mask=None, scaling=0.25, is_causal=True)[0]
    got = causal_chunked(q, k, v, 0.25, max_elements=4 * 200 * 9)  # 9 rows a block
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=1e-5)


def test_decompression_bomb_limit_is_one_plain_line(tmp_path, monkeypatch):
    from qwen_vl_psa import media
    from qwen_vl_psa.errors import MediaError

    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for a 200-megapixel scan
    with pytest.raises(MediaError, match="downscale it first") as e:
        media.load_image(tmp_path / "big.png")
    assert "DOS" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_404_url_fails_before_the_model_stack(http_server, tmp_path):
    rc, seconds, heavy, stderr = run_fast("--input", http_server.url_for("no_such_photo.jpg"), "--cache-dir", tmp_path)
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1 and "HTTP 404" in lines[0], stderr
    assert "paddle" not in heavy and seconds < 3


@pytest.mark.slow
def test_an_html_page_url_fails_before_the_model_stack(http_server, tmp_path):
    (http_server.root / "gallery.html").write_bytes(HTML)  # served as text/html
    rc, seconds, heavy, stderr = run_fast("--input", http_server.url_for("gallery.html"), "--type", "image",
                                          "--cache-dir", tmp_path)
    lines = error_lines(stderr)
    assert rc == 2 and len(lines) == 1 and "HTML page (text/html)" in lines[0], stderr
    assert "paddle" not in heavy and seconds < 3
