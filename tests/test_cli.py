"""The command line, as users run it: a subprocess for the main paths, main(argv) for the errors."""
import base64
import json
import os
import subprocess
import sys

import pytest

import infer_qwen2_5_vl_psa as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "infer_qwen2_5_vl_psa.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_image_streams_answer_then_stats(tiny_model_dir, sample_image_path, tmp_path):
    r = run_cli("--model", tiny_model_dir, "--type", "image", "--input", sample_image_path,
                "--prompt", "Describe this image", "--max-tokens", "8", "--cache-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()  # the answer
    for word in ("---- stats ----", "prefill", "decode", "input tokens", "peak memory"):
        assert word in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_video_json_output_and_type_guess(tiny_model_dir, sample_video_path, tmp_path):
    r = run_cli("--model", tiny_model_dir, "--input", sample_video_path, "--fps", "2", "--max-pixels", "20000",
                "--max-tokens", "5", "--json", "--cache-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout is exactly one JSON object
    assert set(out) == {"answer", "stats"}
    s = out["stats"]
    assert s["frames"] == 6 and s["input_tokens"]["video"] > 0 and s["input_tokens"]["image"] == 0
    assert s["frame_size"][0] * s["frame_size"][1] <= 20000


@pytest.mark.slow
def test_multi_image_url_and_data_uri(tiny_model_dir, sample_image_path, http_server, tmp_path):
    data = open(sample_image_path, "rb").read()
    (http_server.root / "pic.png").write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    r = run_cli("--model", tiny_model_dir, "--type", "image", "--input", http_server.url_for("pic.png"), uri,
                "--max-tokens", "3", "--json", "--cache-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    one = run_cli("--model", tiny_model_dir, "--input", sample_image_path, "--max-tokens", "3", "--json",
                  "--cache-dir", tmp_path)
    two, single = json.loads(r.stdout)["stats"], json.loads(one.stdout)["stats"]
    assert two["input_tokens"]["image"] == 2 * single["input_tokens"]["image"]


@pytest.mark.slow
def test_psa_flags_reach_the_config(tiny_model_dir, sample_video_path, tmp_path):
    r = run_cli("--model", tiny_model_dir, "--input", sample_video_path, "--fps", "2", "--use-psa",
                "--query-block", "64", "--xattn-stride", "8", "--psa-min-seq-len", "0", "--max-tokens", "3",
                "--json", "--cache-dir", tmp_path)
    assert r.returncode == 0, r.stderr
    psa = json.loads(r.stdout)["stats"]["psa"]
    assert psa["enabled"] and psa["calls"] == 2 and psa["seq_len"] > 64


@pytest.mark.slow
def test_error_is_one_line_exit_2_no_traceback(tiny_model_dir, tmp_path):
    r = run_cli("--model", tiny_model_dir, "--input", tmp_path / "nope.jpg", "--type", "image")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "nope.jpg" in lines[0] and "Traceback" not in r.stderr


def test_help_mentions_every_documented_flag():
    r = run_cli("--help")
    for flag in ("--model", "--type", "--input", "--prompt", "--max-tokens", "--dtype", "--fps", "--max-pixels",
                 "--use-psa", "--query-block", "--xattn-stride", "--cache-dir", "--hub", "--no-stream", "--json",
                 "--temperature", "--top-p", "--top-k", "--repetition-penalty", "--seed", "--debug"):
        assert flag in r.stdout, flag


# ---------------------------------------------------------------- bad input, in-process (fast)

@pytest.mark.parametrize("args, words", [
    (["--input", "{img}", "--fps", "0"], "--fps must be > 0"),
    (["--input", "{img}", "--max-pixels", "100"], "28"),
    (["--input", "{video}", "--type", "video", "--min-pixels", "9000", "--max-pixels", "5000"], "pixels"),
    (["--input", "{corrupt}", "--type", "video"], "broken.mp4"),
    (["--input", "{corrupt_img}", "--type", "image"], "bad.png"),
    (["--input", "{url404}", "--type", "image"], "404"),
    (["--input", "ftp://example.org/a.png", "--type", "image"], "ftp"),
    (["--input", "{txt}"], "--type"),  # an existing file of unknown kind (a missing one: "not found")
    (["--input", "{img}", "{img}", "--type", "video"], "one --input"),
    (["--input", "{img}", "--use-psa", "--query-block", "100"], "query_block"),
    (["--input", "{img}", "--max-tokens", "0"], "--max-tokens"),
    ([], "no --input"),
])
def test_bad_input(tiny_model_dir, sample_image_path, sample_video_path, corrupt_video_path, http_server,
                   tmp_path, capsys, args, words):
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG not really")
    fill = {"img": sample_image_path, "video": sample_video_path, "corrupt": corrupt_video_path,
            "corrupt_img": bad_png, "url404": http_server.url + "/missing.png", "txt": tmp_path / "notes.txt"}
    (tmp_path / "notes.txt").write_text("not media")
    argv = ["--model", tiny_model_dir, "--cache-dir", str(tmp_path / "c")] + [a.format(**fill) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in err


def test_model_folder_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["--model", str(tmp_path / "empty"), "--input", "x.jpg"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_no_stream_prints_answer_at_the_end(tiny_model_dir, sample_image_path, tmp_path, capsys):
    assert cli.main(["--model", tiny_model_dir, "--input", str(sample_image_path), "--max-tokens", "4",
                     "--no-stream", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() and "---- stats ----" in out.err


def test_brief_entry_points_import():
    """The names the project has always had keep working: the script module and the PSA patch."""
    from infer_qwen2_5_vl_psa import QwenVLInference
    from qwen2_5_vl_psa_attention import apply_psa, remove_psa
    from qwen_vl_psa.engine import QwenVLInference as engine_class
    from qwen_vl_psa.psa_router import apply_psa as router_apply

    assert QwenVLInference is engine_class and apply_psa is router_apply and callable(remove_psa)


@pytest.mark.slow
def test_help_does_not_import_paddle():
    """--help and argument checks answer without the model stack (a fresh interpreter)."""
    code = ("import sys, infer_qwen2_5_vl_psa as m\n"
            "try:\n    m.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert m.main(['--input', 'x.png', '--fps', '0']) == 2\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('paddle', 'paddleformers')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
