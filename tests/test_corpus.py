"""Corpus mode (--batch): every input answered or carrying its error, resume after SIGKILL, two
processes through paddle.distributed.launch, prefetch overlap, batch-file formats and errors.

Most runs are in-process (corpus.run_batch with one tiny model loaded for the module); the kill,
resume and launcher tests run the real command line in subprocesses."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import _make_image, _make_video

import infer_qwen2_5_vl_psa as cli
from qwen_vl_psa import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "infer_qwen2_5_vl_psa.py")
MAX_TOKENS = "6"
SAME = ("id", "input", "type", "prompt", "answer", "error")  # what must match across runs (not timings)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Generated inputs: 3 images, 2 videos, a corrupt video, and a path that does not exist."""
    d = tmp_path_factory.mktemp("corpus_media")
    files = {f"img{i}": str(_make_image(d / f"img{i}.png", 100 + 28 * i, 80)) for i in range(3)}
    files["vid0"] = str(_make_video(d / "vid0.mp4", frames=60, fps=30))
    files["vid1"] = str(_make_video(d / "vid1.mp4", frames=90, fps=30, width=84, height=112))
    files["broken"] = str(d / "broken.mp4")
    with open(files["broken"], "wb") as f:
        f.write(os.urandom(4096))
    files["missing"] = str(d / "missing.png")
    return files


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def read_jsonl(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n"), "the output ends in an incomplete line"
    return [json.loads(line) for line in data.split(b"\n")[:-1]]


def same(rows):
    return [{k: r.get(k) for k in SAME} for r in rows]


def args_for(batch, output, *extra, model_dir="unused", cache=None):
    argv = ["--model", model_dir, "--batch", str(batch), "--output", str(output), "--max-tokens", MAX_TOKENS,
            *map(str, extra)]
    if cache:
        argv += ["--cache-dir", str(cache)]
    return cli.build_parser().parse_args(argv)


def run_in_process(model, batch, output, *extra, cache=None):
    return corpus.run_batch(args_for(batch, output, *extra, cache=cache), model=model)


def mixed_rows(media):
    return [{"input": media["img0"]}, {"input": media["vid0"], "fps": 2}, {"input": media["missing"]},
            {"input": media["img1"], "prompt": "What colour is it?"}, {"input": media["broken"]},
            {"input": media["vid1"], "id": "clip-b"}, {"input": media["img2"]}]


@pytest.fixture(scope="module")
def reference(shared_model, media, tmp_path_factory):
    """The mixed corpus run once, in one process, uninterrupted: what other runs must equal."""
    d = tmp_path_factory.mktemp("reference")
    batch = write_jsonl(d / "in.jsonl", mixed_rows(media))
    assert run_in_process(shared_model, batch, d / "out.jsonl", cache=d / "cache") == 0
    return read_jsonl(d / "out.jsonl")


# ---------------------------------------------------------------- one process

def test_mixed_corpus_answers_good_items_and_records_errors(model, media, reference, capsys, tmp_path):
    rows = reference
    assert [r["id"] for r in rows] == [1, 2, 3, 4, 5, "clip-b", 7]  # one line per input, input order
    good = [r for r in rows if "error" not in r]
    bad = {r["id"]: r for r in rows if "error" in r}
    assert len(good) == 5 and set(bad) == {3, 5}
    for r in good:
        assert isinstance(r["answer"], str) and r["stats"]["output_tokens"] >= 1
        assert r["stats"]["input_tokens"][r["type"]] > 0 and "load_s" in r["stats"]["prefetch"]
    assert [r["type"] for r in rows] == ["image", "video", "image", "image", "video", "video", "image"]
    assert bad[3]["error_type"] == "MediaNotFoundError" and "missing.png" in bad[3]["error"]
    assert bad[5]["error_type"] == "MediaError" and "broken.mp4" in bad[5]["error"]
    assert all("\n" not in r["error"] for r in bad.values())
    # the prefetched media give the same answer as the plain API on the path
    direct = model.inference_image(media["img0"], "Describe this image.", max_tokens=int(MAX_TOKENS))
    assert rows[0]["answer"] == direct and rows[0]["prompt"] == "Describe this image."
    assert rows[3]["prompt"] == "What colour is it?"

    # a second run of the same command skips everything, loads no model and rewrites nothing
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    capsys.readouterr()
    batch = write_jsonl(tmp_path / "in.jsonl", mixed_rows(media))
    assert corpus.run_batch(args_for(batch, out), model=None) == 0
    err = capsys.readouterr().err
    assert "done 0, failed 0, skipped 7" in err and "items/s" in err
    assert read_jsonl(out) == rows


def test_summary_line_counts_done_and_failed(model, media, tmp_path, capsys):
    batch = write_jsonl(tmp_path / "in.jsonl", [{"input": media["img0"]}, {"input": media["missing"]}])
    assert run_in_process(model, batch, tmp_path / "out.jsonl") == 0
    summary = [ln for ln in capsys.readouterr().err.splitlines() if "items/s" in ln]
    assert len(summary) == 1 and "done 1, failed 1, skipped 0" in summary[0]


def test_plain_text_file_type_inference_and_defaults(model, media, tmp_path, monkeypatch):
    monkeypatch.chdir(os.path.dirname(media["img0"]))  # relative paths are relative to the working directory
    batch = tmp_path / "list.txt"
    batch.write_text("# inputs, one per line\nimg0.png\n\nvid0.mp4\n" + media["img1"] + "\nnotes.dat\n")
    out = tmp_path / "out.jsonl"
    assert run_in_process(model, batch, out, "--prompt", "Caption it.", "--fps", "4") == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["img0.png", "vid0.mp4", media["img1"], "notes.dat"]  # ids are the paths
    assert [r["type"] for r in rows] == ["image", "video", "image", None]
    assert all(r["prompt"] == "Caption it." for r in rows[:3])
    assert rows[1]["stats"]["frames"] == 8  # 2 s at --fps 4
    assert rows[3]["error_type"] == "InputError" and "image or a video" in rows[3]["error"]


def test_per_item_prompt_fps_and_max_pixels(model, media, tmp_path):
    rows = [{"id": "a", "input": media["vid1"], "fps": 2}, {"id": "b", "input": media["vid1"], "fps": 4},
            {"id": "c", "input": media["vid1"], "fps": 2, "max_pixels": 5000},
            {"id": "d", "input": media["img2"], "max_pixels": 3200, "prompt": "Count the squares."},
            {"id": "e", "input": media["img2"], "type": "image"},
            {"id": "f", "input": media["img2"], "type": "audio"}, {"id": "g", "input": media["vid0"], "fps": 0}]
    out = tmp_path / "out.jsonl"
    assert run_in_process(model, write_jsonl(tmp_path / "in.jsonl", rows), out) == 0
    r = {row["id"]: row for row in read_jsonl(out)}
    assert r["a"]["stats"]["frames"] == 6 and r["b"]["stats"]["frames"] == 12  # 3 s at 2 and 4 fps
    h, w = r["c"]["stats"]["frame_size"]
    assert h * w <= 5000 < r["a"]["stats"]["frame_size"][0] * r["a"]["stats"]["frame_size"][1]
    assert r["d"]["stats"]["input_tokens"]["image"] < r["e"]["stats"]["input_tokens"]["image"]
    assert r["d"]["prompt"] == "Count the squares." and r["e"]["prompt"] == "Describe this image."
    assert r["d"]["answer"] == model.inference_image(media["img2"], "Count the squares.", max_pixels=3200,
                                                     max_tokens=int(MAX_TOKENS))
    assert "image" in r["f"]["error"] and "video" in r["f"]["error"]
    assert r["g"]["error_type"] == "InputError" and "fps" in r["g"]["error"]


# ---------------------------------------------------------------- bad arguments: exit 2, before any model loads

def main_err(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return code, lines[0]


def test_duplicate_ids_rejected_up_front(tmp_path, capsys):
    batch = write_jsonl(tmp_path / "in.jsonl", [{"input": "a.png", "id": "x"}, {"input": "b.png"},
                                                {"input": "c.png", "id": "x"}, {"input": "d.png", "id": 2}])
    code, line = main_err(["--batch", batch, "--output", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and "'x' on lines 1, 3" in line and "'2' on lines 2, 4" in line
    assert not (tmp_path / "o.jsonl").exists()
    (tmp_path / "list.txt").write_text("a.png\nb.png\na.png\n")  # plain text: the id is the path
    code, line = main_err(["--batch", str(tmp_path / "list.txt"), "--output", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and "'a.png' on lines 1, 3" in line


@pytest.mark.parametrize("content, words", [
    ('{"input": "a.png"}\n{"input": "b.png"}\n{"input": "c.png",\n', ["line 3", "not valid JSON"]),
    ('{"input": "a.png"}\n["b.png"]\n', ["line 2", "not an object"]),
    ('{"input": "a.png"}\n\n{"prompt": "hi"}\n', ["line 3", '"input"']),
    ('{"input": "a.png", "id": [1]}\n', ["line 1", '"id"']),
    ("\n\n", ["no inputs"]),
])
def test_bad_batch_file_says_which_line(tmp_path, capsys, content, words):
    batch = tmp_path / "in.jsonl"
    batch.write_text(content)
    code, line = main_err(["--batch", str(batch), "--output", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2
    for w in words:
        assert w in line, line


def test_missing_output_unreadable_batch_and_conflicting_flags(tmp_path, capsys):
    batch = write_jsonl(tmp_path / "in.jsonl", [{"input": "a.png"}])
    code, line = main_err(["--batch", batch], capsys)
    assert code == 2 and "--output" in line
    code, line = main_err(["--batch", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "nope.jsonl" in line
    code, line = main_err(["--batch", batch, "--output", str(tmp_path / "o"), "--input", "x.png"], capsys)
    assert code == 2 and "--input" in line
    code, line = main_err(["--batch", batch, "--output", str(tmp_path / "o"), "--prompt", "a", "--prompt", "b"],
                          capsys)
    assert code == 2 and "--prompt" in line
    code, line = main_err(["--merge", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "--batch" in line
    code, line = main_err(["--merge", "--batch", batch, "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "nothing to merge" in line


# ---------------------------------------------------------------- crash and resume

@pytest.mark.slow
def test_sigkill_then_rerun_gives_every_id_once_and_same_answers(tiny_model_dir, media, reference, http_server,
                                                                  tmp_path):
    # The 5th input is fetched from a server that stalls, so the first run is surely still going
    # when it is killed after 3 lines.
    for name in ("img1.png", "vid1.mp4", "img2.png"):
        with open(os.path.join(os.path.dirname(media["img0"]), name), "rb") as f:
            (http_server.root / name).write_bytes(f.read())
    rows = mixed_rows(media)
    rows[4] = {"input": http_server.url_for("__slow__/img2.png"), "id": 5}
    rows.append({"input": http_server.url_for("vid1.mp4"), "id": "remote-clip"})
    batch = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, SCRIPT, "--model", tiny_model_dir, "--batch", batch, "--output", str(out),
           "--max-tokens", MAX_TOKENS, "--cache-dir", str(tmp_path / "cache")]
    http_server.slow_s = 30
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    first = read_jsonl(out)  # whole lines only
    assert 3 <= len(first) < len(rows)
    with open(out, "ab") as f:  # as if the kill had landed inside a write
        f.write(b'{"id": 6, "input": "half a li')

    http_server.slow_s = 0.01
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"skipped {len(first)}" in r.stderr and "incomplete last line" in r.stderr
    rows_out = read_jsonl(out)
    assert [x["id"] for x in rows_out] == [1, 2, 3, 4, 5, "clip-b", 7, "remote-clip"]
    want, got = same(reference), same(rows_out)
    assert got[:4] + got[5:7] == want[:4] + want[5:7]
    assert got[4]["answer"] == reference[6]["answer"]  # img2.png fetched over HTTP: same answer as from disk
    assert got[7]["answer"] == reference[5]["answer"]  # vid1.mp4 likewise


# ---------------------------------------------------------------- several processes

def test_env_var_ranks_share_disjointly_and_the_last_one_merges(model, media, reference, tmp_path, monkeypatch,
                                                                capsys):
    batch = write_jsonl(tmp_path / "in.jsonl", mixed_rows(media))
    out = tmp_path / "out.jsonl"
    part = lambda r: tmp_path / f"out.jsonl.rank{r}-of-2"  # noqa: E731
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "2")
    monkeypatch.setenv("PADDLE_TRAINER_ID", "0")
    assert run_in_process(model, batch, out) == 0
    assert os.environ["PADDLE_TRAINER_ID"] == "0"  # hidden from Paddle during the run, then restored
    # inputs 0, 2, 4, 6; a part file is in the order the loads finished (the merge sorts)
    assert sorted(x["id"] for x in read_jsonl(part(0))) == [1, 3, 5, 7]
    assert not out.exists()  # rank 1 has not run: nothing merged yet
    assert "3 of 7 inputs still have no result" in capsys.readouterr().err

    # --merge now: what exists, in order, parts kept, exit 1 (incomplete)
    assert cli.main(["--merge", "--batch", batch, "--output", str(out)]) == 1
    assert [x["id"] for x in read_jsonl(out)] == [1, 3, 5, 7] and part(0).exists()

    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    assert run_in_process(model, batch, out) == 0
    assert same(read_jsonl(out)) == same(reference)  # merged by the last rank, in input order
    assert not part(0).exists() and not part(1).exists()


def test_resume_with_a_different_number_of_processes(model, media, reference, tmp_path, monkeypatch):
    batch = write_jsonl(tmp_path / "in.jsonl", mixed_rows(media))
    out = tmp_path / "out.jsonl"
    monkeypatch.setenv("PADDLE_TRAINERS_NUM", "3")
    monkeypatch.setenv("PADDLE_TRAINER_ID", "2")
    assert run_in_process(model, batch, out) == 0  # ranks 0 and 1 of 3 never ran
    monkeypatch.delenv("PADDLE_TRAINERS_NUM")
    monkeypatch.delenv("PADDLE_TRAINER_ID")
    args = args_for(batch, out)
    calls = []
    real = model.inference_multi_image
    monkeypatch.setattr(model, "inference_multi_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert corpus.run_batch(args, model=model) == 0
    assert len(calls) == 3  # img0, img1, img2: rank 2 of 3 already answered the inputs on lines 3 and 6
    assert same(read_jsonl(out)) == same(reference)
    assert corpus.part_files(str(out)) == []


def test_launcher_variables_are_hidden_from_paddle_and_pick_the_gpu(monkeypatch):
    import paddle

    for k, v in {"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "2", "PADDLE_LOCAL_RANK": "1",
                 "PADDLE_TRAINER_ENDPOINTS": "127.0.0.1:1,127.0.0.1:2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FLAGS_selected_gpus", raising=False)
    assert corpus.rank_and_world() == (1, 2)
    with corpus.single_process_view() as launch_env:
        # paddleformers' loader would otherwise start a collective (init_parallel_env) and wait for rank 0
        assert paddle.distributed.get_world_size() == 1 and "PADDLE_TRAINERS_NUM" not in os.environ
        assert launch_env["PADDLE_LOCAL_RANK"] == "1"
        monkeypatch.setattr(paddle.device, "is_compiled_with_cuda", lambda: True)
        monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: 4)
        env = {}
        corpus.select_device_from_env(launch_env, env)
        assert env == {"FLAGS_selected_gpus": "1"}  # what paddle.set_device("gpu") reads
        env = {"FLAGS_selected_gpus": "3"}  # set by the launcher: kept
        corpus.select_device_from_env(launch_env, env)
        assert env == {"FLAGS_selected_gpus": "3"}
    assert os.environ["PADDLE_TRAINERS_NUM"] == "2"
    for bad in ({"PADDLE_TRAINER_ID": "2", "PADDLE_TRAINERS_NUM": "2"}, {"PADDLE_TRAINER_ID": "x"}):
        with pytest.raises(corpus.InputError):
            corpus.rank_and_world(bad)


@pytest.mark.slow
def test_two_processes_through_paddle_launch(tiny_model_dir, media, reference, tmp_path):
    batch = write_jsonl(tmp_path / "in.jsonl", mixed_rows(media))
    out = tmp_path / "out.jsonl"
    logs = tmp_path / "log"
    r = subprocess.run([sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2",
                        "--log_dir", str(logs), SCRIPT, "--model", tiny_model_dir, "--batch", batch,
                        "--output", str(out), "--max-tokens", MAX_TOKENS, "--cache-dir", str(tmp_path / "cache")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    worker = {k: (logs / f"workerlog.{k}").read_text() for k in (0, 1) if (logs / f"workerlog.{k}").exists()}
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:] + str(worker)
    summaries = {}
    for k, text in worker.items():
        line = [ln for ln in text.splitlines() if ln.startswith(f"rank {k}/2: done")]
        assert len(line) == 1, text[-2000:]
        n = line[0].split("done ")[1]
        summaries[k] = int(n.split(",")[0]) + int(n.split("failed ")[1].split(",")[0])
    assert summaries == {0: 4, 1: 3}  # disjoint shares: together every input exactly once
    assert same(read_jsonl(out)) == same(reference)  # merged output equals the one-process run
    assert corpus.part_files(str(out)) == []


# ---------------------------------------------------------------- prefetch

def _timeline(model, monkeypatch):
    """Record (start, end, id) of every media load and every generation."""
    loads, gens = [], []
    real_load, real_image = corpus.load_item, model.inference_multi_image

    def load(item, *rest):
        t0 = time.perf_counter()
        try:
            return real_load(item, *rest)
        finally:
            loads.append((t0, time.perf_counter(), item.id))

    def generate(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_image(*a, **k)
        finally:
            gens.append((t0, time.perf_counter(), threading.current_thread().name))

    monkeypatch.setattr(corpus, "load_item", load)
    monkeypatch.setattr(model, "inference_multi_image", generate)
    return loads, gens


def _overlaps(loads, gens):
    return sum(1 for a0, a1, _ in loads for g0, g1, _ in gens if a0 < g1 and g0 < a1)


@pytest.mark.parametrize("depth", [2, 0])
def test_prefetch_fetches_the_next_item_during_generation(model, media, http_server, tmp_path, monkeypatch, depth):
    with open(media["img0"], "rb") as f:
        data = f.read()
    for i in range(4):
        (http_server.root / f"p{i}.png").write_bytes(data)
    http_server.slow_s = 0.3
    batch = write_jsonl(tmp_path / "in.jsonl", [{"input": http_server.url_for(f"__slow__/p{i}.png")}
                                                for i in range(4)])
    loads, gens = _timeline(model, monkeypatch)
    t0 = time.perf_counter()
    assert run_in_process(model, batch, tmp_path / "out.jsonl", "--prefetch", depth,
                          cache=tmp_path / "cache") == 0
    total = time.perf_counter() - t0
    assert len(loads) == 4 and len(gens) == 4
    assert all(r.get("answer") is not None for r in read_jsonl(tmp_path / "out.jsonl"))
    assert all(name == "MainThread" for _, _, name in gens)
    if depth:
        # fetches of later items ran while earlier items were being generated
        assert _overlaps(loads, gens) >= 2, (loads, gens)
        fetch = sum(b - a for a, b, _ in loads)
        generate = sum(b - a for a, b, _ in gens)
        print(f"prefetch {depth}: total {total:.2f} s, fetch {fetch:.2f} s, generate {generate:.2f} s")
    else:
        assert _overlaps(loads, gens) == 0  # the measurement can tell: without prefetch, strictly in turn
