"""The OpenAI-compatible server (qwen_vl_psa/server*.py), started for real on 127.0.0.1 and spoken to
with the official `openai` client and raw HTTP (httpx). Tiny checkpoint, CPU, greedy decoding, so
every answer can be compared with the engine's own cold answer to the same question.

Most tests share one in-process server (uvicorn in a thread, over the session's shared model);
the `slow` ones start `infer_qwen2_5_vl_psa.py serve` as a subprocess, as a user would.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
NAME = "tiny"
Q = "Describe this image."
N = 6  # max_tokens of most requests: short answers keep the suite fast


class RunningServer:
    """uvicorn serving `app` on a free port of 127.0.0.1, in a daemon thread."""

    def __init__(self, app):
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats", timeout=10).json()

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


def make_server(engine, **settings) -> RunningServer:
    from qwen_vl_psa.server_app import create_app
    from qwen_vl_psa.server_media import MediaLimits
    from qwen_vl_psa.server_protocol import ServeSettings

    media = MediaLimits(max_bytes=settings.pop("max_media_bytes", 256 << 10), timeout_s=settings.pop("timeout_s", 2.0),
                        allowed_local_dir=settings.pop("allowed_local_dir", None))
    defaults = dict(served_model_name=NAME, max_queue=1, max_request_bytes=1 << 20, media=media)
    return RunningServer(create_app(engine, ServeSettings(**{**defaults, **settings})))


@pytest.fixture(scope="module")
def api(shared_model):
    server = make_server(shared_model)
    yield server
    server.close()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def user(*parts, text: str = Q) -> dict:
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def data_uri(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def post(server: RunningServer, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json", **kw.pop("headers", {})},
                      timeout=kw.pop("timeout", 60), **kw)


def chat(server: RunningServer, messages, **kw):
    return server.client().chat.completions.create(model=NAME, messages=messages, max_tokens=kw.pop("max_tokens", N),
                                                   **kw)


# ----------------------------------------------------------------------------- the happy paths


def test_models_and_health(api):
    models = api.client().models.list().data
    assert [m.id for m in models] == [NAME]
    health = httpx.get(api.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_image_by_url_and_data_uri_equal_the_cold_answer(api, model, http_server, sample_image_path):
    (http_server.root / "photo.png").write_bytes(sample_image_path.read_bytes())
    by_url = chat(api, [user(image_part(http_server.url_for("photo.png")))])
    by_data = chat(api, [user(image_part(data_uri(sample_image_path, "image/png")))])
    cold = model.inference_image(str(sample_image_path), Q, max_tokens=N)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content == cold
    # usage: the prompt as the engine counts it; every generated token
    assert by_url.usage.prompt_tokens == model.stats["input_tokens"]["total"]
    assert by_url.usage.completion_tokens == len(model.last_token_ids)
    assert by_url.usage.total_tokens == by_url.usage.prompt_tokens + by_url.usage.completion_tokens
    assert by_url.choices[0].finish_reason == ("length" if len(model.last_token_ids) == N else "stop")
    assert by_url.model == NAME and by_url.id.startswith("chatcmpl-")


def test_several_images(api, model, http_server, make_image, tmp_path):
    paths = [make_image(tmp_path / "a.png", 100, 80), make_image(tmp_path / "b.jpg", 64, 96)]
    for p in paths:
        (http_server.root / p.name).write_bytes(p.read_bytes())
    r = chat(api, [user(*[image_part(http_server.url_for(p.name)) for p in paths], text="Compare them.")])
    assert r.choices[0].message.content == model.inference_multi_image([str(p) for p in paths], "Compare them.",
                                                                       max_tokens=N)
    assert r.model_extra["stats"]["input_tokens"]["image"] > 0


def test_video_questions_reuse_the_prefix_and_equal_cold_runs(api, model, http_server, sample_video_path):
    (http_server.root / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    url = http_server.url_for("clip.mp4")
    questions = ["What happens in the video?", "What colour is the square?"]
    answers = [chat(api, [user(video_part(url), text=q)], extra_body={"fps": 2}) for q in questions]
    caches = [a.model_extra["stats"]["prefix_cache"] for a in answers]
    assert [c["status"] for c in caches] == ["miss", "hit"]
    assert caches[1]["time_saved_s"] > 0 and caches[1]["cached_prefix_tokens"] > 0
    assert http_server.count("clip.mp4") == 1  # a hit skips the download, decode, vision encoder, prefill
    for q, a in zip(questions, answers):
        assert a.choices[0].message.content == model.inference_video(str(sample_video_path), q, fps=2, max_tokens=N)
        assert a.usage.prompt_tokens == model.stats["input_tokens"]["total"]
    assert api.stats()["prefix_cache"]["entries"] >= 1
    # other processing options are other media: a miss
    other = chat(api, [user(video_part(url), text=questions[0])], extra_body={"mm_processor_kwargs": {"fps": 4}})
    assert other.model_extra["stats"]["prefix_cache"]["status"] == "miss"


def test_multi_turn_reuses_the_prefix_and_equals_a_cold_run(api, model, sample_video_path):

    video = video_part(data_uri(sample_video_path, "video/mp4"))
    first = chat(api, [user(video, text="What happens?")], extra_body={"fps": 3})
    turns = [user(video, text="What happens?"), {"role": "assistant", "content": "A square moves."},
             {"role": "user", "content": "Which way does it move?"}]
    second = chat(api, turns, extra_body={"fps": 3})
    assert first.model_extra["stats"]["prefix_cache"]["status"] == "miss"
    assert second.model_extra["stats"]["prefix_cache"]["status"] == "hit"
    history = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
               {"role": "assistant", "content": "A square moves."}]
    text = model.prompts.chat_text([{"type": "text", "text": "Which way does it move?"}], history=history)
    cold = model.ask_text(model.load_video(str(sample_video_path), fps=3), text, max_tokens=N)
    assert second.choices[0].message.content == cold
    assert second.usage.prompt_tokens == model.stats["input_tokens"]["total"]


def test_text_only_and_a_system_turn(api, model):
    from qwen_vl_psa.prompt import MediaInput

    r = chat(api, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    text = model.prompts.chat_text([{"type": "text", "text": "Hello"}], history=[{"role": "system",
                                                                                  "content": "Be brief."}])
    assert r.choices[0].message.content == model.ask_text(MediaInput([], {}), text, max_tokens=N)
    r = chat(api, [{"role": "user", "content": "Hello"}], max_tokens=50, extra_body={"max_completion_tokens": 3})
    assert r.usage.completion_tokens <= 3  # max_completion_tokens wins over the older max_tokens


def test_streaming_concatenates_to_the_answer(api, http_server, sample_image_path):
    (http_server.root / "photo.png").write_bytes(sample_image_path.read_bytes())
    messages = [user(image_part(http_server.url_for("photo.png")))]
    whole = chat(api, messages, max_tokens=12)
    chunks = list(api.client().chat.completions.create(model=NAME, messages=messages, max_tokens=12, stream=True,
                                                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # raw SSE: data lines, ending with [DONE]
    raw = post(api, {"model": NAME, "messages": messages, "max_tokens": 3, "stream": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    lines = [ln for ln in raw.text.split("\n\n") if ln.strip()]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"


def test_stop_strings_end_the_answer_streamed_or_not(api):
    messages = [{"role": "user", "content": "Tell a story."}]
    full = chat(api, messages, max_tokens=16).choices[0].message.content
    assert len(full) > 6, full
    stop = full[3:5]
    expected = full[:full.find(stop)]
    r = chat(api, messages, max_tokens=16, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks = api.client().chat.completions.create(model=NAME, messages=messages, max_tokens=16, stop=stop,
                                                  stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_stop_filter_holds_back_what_may_start_a_stop_string():
    from qwen_vl_psa.generation import StopGeneration, TextStream
    from qwen_vl_psa.server_protocol import StreamFilter

    sent = []
    f = StreamFilter(["cd", "\n\n"], sent.append, threading.Event())
    f("ab")
    f("c")
    with pytest.raises(StopGeneration):
        f("d!")
    assert "".join(sent) == "ab" == f.finish("abcd!") and f.cut == 2
    f = StreamFilter(["cd"], sent.clear() or sent.append, threading.Event())
    f("abc")
    assert f.finish("abce") == "abce" and "".join(sent) == "abce"  # the held-back "c" comes at the end
    cancel = threading.Event()
    f = StreamFilter([], sent.append, cancel)
    cancel.set()
    with pytest.raises(StopGeneration):
        f("x")

    class Chars:  # a tokenizer whose ids are characters
        def decode(self, ids, skip_special_tokens=True):
            return "".join(ids)

    def stop_at_end(text):
        raise StopGeneration("stop")
    stream = TextStream(Chars(), stop_at_end)
    stream.ids = list("ab")
    assert stream.end() == "ab"  # a stop found in the last text is not an error


def test_sampling_with_a_seed_repeats(api):
    messages = [{"role": "user", "content": "Say something."}]
    a, b = (chat(api, messages, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_psa_on_per_request_equals_a_cold_psa_run(shared_model, model, sample_video_path):
    from psa_paddle import AttentionConfig

    cfg = AttentionConfig(query_block=64, min_seq_len=0)  # PSA on the tiny model's few hundred tokens
    server = make_server(shared_model, psa_config=cfg)
    try:
        video = video_part(data_uri(sample_video_path, "video/mp4"))
        questions = ["What happens?", "What moves?"]
        psa = [post(server, {**_body(video), "messages": [user(video, text=q)], "use_psa": True, "fps": 4,
                             "max_tokens": N}).json() for q in questions]
        dense = post(server, {**_body(video), "messages": [user(video, text=questions[0])], "fps": 4,
                              "max_tokens": N}).json()
    finally:
        server.close()
    assert [r["stats"]["prefix_cache"]["status"] for r in psa] == ["miss", "hit"]
    assert psa[0]["stats"]["psa"]["calls"] > 0 and dense["stats"]["psa"] is False
    assert dense["stats"]["prefix_cache"]["status"] == "miss"  # PSA on and off are different prefixes
    model.enable_psa(cfg)
    for q, r in zip(questions, psa):
        assert r["choices"][0]["message"]["content"] == model.inference_video(str(sample_video_path), q, fps=4,
                                                                               max_tokens=N)
    model.disable_psa()
    assert dense["choices"][0]["message"]["content"] == model.inference_video(str(sample_video_path), questions[0],
                                                                               fps=4, max_tokens=N)


# ----------------------------------------------------------------------------- load


def test_full_queue_429_disconnect_stops_generation_health_stays_up(api):
    long = {"model": NAME, "messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 3000,
            "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", api.url + "/v1/chat/completions",
                                                           json=long) as stream:
        lines = stream.iter_lines()
        first = json.loads(next(ln for ln in lines if ln.startswith("data: {"))[6:])
        job_id = first["id"]
        # the model is busy: /health still answers at once
        t0 = time.perf_counter()
        assert httpx.get(api.url + "/health", timeout=5).status_code == 200
        assert time.perf_counter() - t0 < 1.0
        # one waits (max_queue=1) ...
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=post(api, {**long, "stream": False, "max_tokens": 2})))
        t.start()
        deadline = time.time() + 20
        while api.stats()["queue"]["waiting"] < 1:
            assert time.time() < deadline
            time.sleep(0.05)
        # ... the next is turned away
        busy = post(api, {**long, "stream": False, "max_tokens": 2})
        assert busy.status_code == 429, busy.text
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["code"] == "queue_full"
    # leaving the `with` closed the stream mid-answer: the generation stops, the waiting one runs
    t.join(60)
    assert waiting["r"].status_code == 200
    done = {j["id"]: j for j in api.stats()["recent"]}[job_id]
    assert done["stopped_by"] == "cancelled" and done["completion_tokens"] < 3000
    assert api.stats()["queue"] == {"running": 0, "waiting": 0, "max_queue": 1}


def test_health_answers_during_a_long_prefill(api, sample_video_path):
    # fps 10: ~2.1k video tokens, a few seconds of decode, vision encoder and prefill on 2 cores;
    # max_tokens 1, so the job is almost all prefill
    body = {**_body(video_part(data_uri(sample_video_path, "video/mp4"))), "fps": 10, "max_tokens": 1}
    done = {}
    t = threading.Thread(target=lambda: done.update(r=post(api, body)))
    t.start()
    while api.stats()["queue"]["running"] == 0 and t.is_alive():
        time.sleep(0.02)
    latencies = []
    while t.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(api.url + "/health", timeout=5).status_code == 200
        if t.is_alive():  # answered while the model was busy
            latencies.append(time.perf_counter() - t0)
        time.sleep(0.1)
    t.join()
    assert done["r"].status_code == 200 and done["r"].json()["usage"]["prompt_tokens"] > 2000
    assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


def test_a_slow_media_server_delays_only_its_own_request(shared_model, http_server, sample_image_path):
    # the image's server answers after 3 s; a text question sent meanwhile must not wait for it
    server = make_server(shared_model, timeout_s=10.0)
    try:
        (http_server.root / "photo.png").write_bytes(Path(sample_image_path).read_bytes())
        http_server.slow_s = 3
        done = {}

        def slow():
            done["image"] = post(server, _body(image_part(http_server.url + "/__slow__/photo.png")))
            done["image_t"] = time.perf_counter()
        t = threading.Thread(target=slow)
        t.start()
        deadline = time.time() + 10
        while not any("__slow__" in h for h in http_server.hits):  # the download has started
            assert time.time() < deadline
            time.sleep(0.02)
        t0 = time.perf_counter()
        text = post(server, {"model": NAME, "messages": [{"role": "user", "content": "Hello?"}], "max_tokens": 2})
        text_t = time.perf_counter()
        t.join(30)
        assert text.status_code == 200 and done["image"].status_code == 200, done["image"].text
        assert text_t < done["image_t"] and text_t - t0 < 2.5
    finally:
        server.close()


def test_a_non_streaming_client_that_leaves_stops_its_generation(api):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Another long story."}], "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):
        post(api, body, timeout=1.5)
    deadline = time.time() + 30
    while api.stats()["queue"]["running"]:
        assert time.time() < deadline, "the generation did not stop"
        time.sleep(0.1)
    last = api.stats()["recent"][-1]
    assert last["stopped_by"] == "cancelled" and last["completion_tokens"] < 3000


# ----------------------------------------------------------------------------- errors


class _Redirect(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(302)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def redirect_server():
    def start(target: str) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
        srv.target = target
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/x.png"
    servers = []
    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _body(*parts, **extra) -> dict:
    return {"model": NAME, "messages": [user(*parts)], "max_tokens": 2, **extra}


def test_error_classes(api, model, http_server, redirect_server, sample_image_path, monkeypatch):
    (http_server.root / "photo.png").write_bytes(sample_image_path.read_bytes())
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(http_server.root / "big.png")  # ~470 KiB: over the 256 KiB media limit
    bomb = bytearray(sample_image_path.read_bytes())  # a small PNG whose header says 10000x10000
    bomb[16:24] = struct.pack(">II", 10000, 10000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))
    http_server.slow_s = 4  # over the 2 s media timeout
    photo = image_part(http_server.url_for("photo.png"))
    cases = [  # (body, status, code, words in the message)
        ({**_body(photo), "model": "gpt-4o"}, 404, "model_not_found", "gpt-4o"),
        (_body({"type": "audio_url", "audio_url": {"url": "x"}}), 400, "unsupported_content_type", "audio_url"),
        (_body(image_part("data:image/png;base64,@@not base64@@")), 400, "invalid_media", "invalid base64"),
        (_body(image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode())), 400,
         "invalid_media", "cannot decode image"),
        (_body(image_part("data:image/png;base64," + base64.b64encode(bytes(bomb)).decode())), 400,
         "invalid_media", "megapixels"),
        (_body(video_part(http_server.url_for("photo.png")), fps=0), 400, None, "fps must be > 0"),
        (_body(photo, n=2), 400, "unsupported_parameter", "n must be 1"),
        (_body(photo, temperature=-1), 400, None, "temperature must be >= 0"),
        (_body(photo, tools=[{"type": "function", "function": {"name": "f"}}]), 400, "unsupported_parameter",
         "tools"),
        (_body(photo, max_tokens="many"), 400, "invalid_request", "max_tokens"),
        ({"model": NAME}, 400, "invalid_request", "messages"),
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, None, "role"),
        (_body(image_part(http_server.url + "/__status__/500")), 502, "media_fetch_failed", "HTTP 500"),
        (_body(image_part(f"http://127.0.0.1:{_closed_port()}/a.png")), 502, "media_fetch_failed", "connection"),
        (_body(image_part(http_server.url + "/__slow__/photo.png")), 504, "media_fetch_timeout", "within 2 s"),
        (_body(image_part(http_server.url_for("big.png"))), 400, "media_too_large", "size limit"),
        (_body(image_part("ftp://127.0.0.1/a.png")), 400, "unsupported_url_scheme", "ftp"),
        (_body(image_part(redirect_server("file:///etc/passwd"))), 400, "redirect_refused", "redirects to file"),
        (_body(image_part(redirect_server(http_server.url + "/__status__/404"))), 502, "media_fetch_failed",
         "HTTP 404"),
        (_body(image_part("file:///etc/passwd")), 400, "local_media_forbidden", "--allowed-local-media-path"),
        (_body(image_part(str(sample_image_path))), 400, "local_media_forbidden", "local files"),
    ]
    for body, status, code, words in cases:
        r = post(api, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "code"} and words.lower() in err["message"].lower(), (words, err)
        assert "\n" not in err["message"]
        if code is not None:
            assert err["code"] == code, err
    # too long for the context (the tiny model's is 128k tokens: lowered for this test)
    monkeypatch.setattr(model.prompts, "max_context", 40)  # the engine's max_context reads it
    r = post(api, _body(photo))
    assert r.status_code == 400 and "over the model's context" in r.json()["error"]["message"]
    monkeypatch.undo()
    # oversized body: 413 (the limit is 1 MiB here)
    r = post(api, _body(image_part("data:image/png;base64," + "A" * (1 << 20))))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # unknown route, and the openai client's own error types
    r = httpx.get(api.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        api.client().chat.completions.create(model="other", messages=[user(photo)], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.client().chat.completions.create(model=NAME, messages=[user(photo)], max_tokens=0)
    # errors in a streamed request keep their status too
    r = post(api, _body(image_part("file:///etc/passwd"), stream=True))
    assert r.status_code == 400 and r.json()["error"]["code"] == "local_media_forbidden"
    # an http(s) redirect is followed; the server still answers after all that
    assert post(api, _body(image_part(redirect_server(http_server.url_for("photo.png"))))).status_code == 200


def test_local_files_only_under_the_allowed_folder(shared_model, tmp_path, sample_image_path, sample_video_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "photo.png").write_bytes(sample_image_path.read_bytes())
    (allowed / "clip.mp4").write_bytes(sample_video_path.read_bytes())
    (tmp_path / "secret.png").write_bytes(sample_image_path.read_bytes())
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    server = make_server(shared_model, allowed_local_dir=str(allowed))
    try:
        ok = [_body(image_part((allowed / "photo.png").as_uri())), _body(image_part(str(allowed / "photo.png"))),
              _body(video_part((allowed / "clip.mp4").as_uri()))]
        for body in ok:
            assert post(server, body).status_code == 200
        refused = [str(tmp_path / "secret.png"), (tmp_path / "secret.png").as_uri(),
                   str(allowed / ".." / "secret.png"), str(allowed / "link.png")]
        for url in refused:
            r = post(server, _body(image_part(url)))
            assert r.status_code == 400 and r.json()["error"]["code"] == "local_media_forbidden", (url, r.text)
        r = post(server, _body(image_part(str(allowed / "missing.png"))))
        assert r.status_code == 400 and "not found" in r.json()["error"]["message"]
    finally:
        server.close()


def test_api_key(shared_model):
    server = make_server(shared_model, api_key="s3cret")
    try:
        body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = post(server, body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/stats").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        r = server.client(api_key="s3cret").chat.completions.create(model=NAME, **{k: body[k] for k in
                                                                                  ("messages", "max_tokens")})
        assert r.choices[0].message.content is not None
    finally:
        server.close()


def test_prefix_cache_stays_within_its_budget(shared_model, sample_video_path, sample_image_path, tmp_path):
    server = make_server(shared_model, prefix_cache_bytes=1)  # smaller than any prefix: used once, dropped
    try:
        video = video_part(data_uri(sample_video_path, "video/mp4"))
        for _ in range(2):
            r = post(server, _body(video))
            assert r.json()["stats"]["prefix_cache"]["status"] == "miss"
            assert r.json()["stats"]["prefix_cache"]["kept"] is False
        cache = server.stats()["prefix_cache"]
        assert cache["entries"] == 0 and cache["bytes"] == 0 and cache["too_large"] == 2
    finally:
        server.close()
    # room for one image prefix: the least recently used one is evicted
    flipped = tmp_path / "flipped.png"
    Image.open(sample_image_path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    a, b = image_part(data_uri(sample_image_path, "image/png")), image_part(data_uri(flipped, "image/png"))
    probe = make_server(shared_model)
    try:
        size = post(probe, _body(a)).json()["stats"]["prefix_cache"]["bytes"]
    finally:
        probe.close()
    server = make_server(shared_model, prefix_cache_bytes=size + size // 2)
    try:
        statuses = [post(server, _body(p)).json()["stats"]["prefix_cache"]["status"] for p in (a, a, b, a)]
        assert statuses == ["miss", "hit", "miss", "miss"]
        cache = server.stats()["prefix_cache"]
        assert cache["evictions"] == 2 and cache["entries"] == 1 and cache["bytes"] == size
    finally:
        server.close()


# ----------------------------------------------------------------------------- as a user runs it


def _run(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "infer_qwen2_5_vl_psa.py"), *args], capture_output=True,
                          text=True, cwd=str(ROOT), **kw)


@pytest.mark.slow
def test_serve_help_is_fast_and_bad_arguments_fail_before_loading():
    t0 = time.perf_counter()
    r = _run(["serve", "--help"], timeout=60)
    assert r.returncode == 0 and "--allowed-local-media-path" in r.stdout and "--api-key" in r.stdout
    assert time.perf_counter() - t0 < 10
    r = _run(["serve", "--model", "/nonexistent", "--fps", "0"], timeout=60)
    assert r.returncode == 2 and "fps must be > 0" in r.stderr


@pytest.mark.slow
def test_serve_command_end_to_end(tiny_model_dir, http_server, sample_image_path, tmp_path):
    (http_server.root / "photo.png").write_bytes(sample_image_path.read_bytes())
    port = _closed_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qwen_vl_psa", "serve", "--model", tiny_model_dir, "--port",
                             str(port), "--served-model-name", NAME, "--api-key", "k"],
                            cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        messages = [user(image_part(http_server.url_for("photo.png")))]
        whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N)
        streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=N, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
        assert whole.model_extra["stats"]["prefix_cache"]["status"] == "miss"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert "prefix cache hit" in text and "prefix cache miss" in text  # the log shows the reuse
