"""Every Qwen2.5-VL checkpoint layout loads, read-only, with the official layout's numbers (issue 12),
and damaged checkpoints give one `error:` line (issue 11, item 5).

Each layout is written by qwen_vl_psa.tiny_checkpoint with the same seed, so the weights are the
same; the test loads it through QwenVLInference(DIR) / `--model DIR` as a user would and compares
greedy tokens and the prompt's logits with the hub layout's. Every load runs under an audit hook
that records any attempt to write, create, remove or rename anything in the model folder (the
tests run as root, where a read-only folder does not stop a write, so the attempt itself is what
is checked), and the folder must be byte-identical afterwards.
"""
import hashlib
import json
import os
import shutil
import stat
import sys
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from qwen_vl_psa import cli
from qwen_vl_psa.checkpoint import build_model, hub_config, inspect_checkpoint, paddle_config
from qwen_vl_psa.engine import QwenVLInference
from qwen_vl_psa.errors import ModelLoadError
from qwen_vl_psa.media import load_image
from qwen_vl_psa.tiny_checkpoint import make_tiny_checkpoint

PROMPT = "Describe this image."


# ----------------------------------------------------------------------------- helpers

_WATCH = {"roots": None, "events": None}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGE_EVENTS = {"os.remove", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.symlink", "os.link",
                  "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move",
                  "shutil.copyfile", "shutil.copytree"}


def _under(path) -> bool:
    if isinstance(path, int) or path is None:
        return False
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return any(real == r or real.startswith(r + os.sep) for r in _WATCH["roots"])


def _audit(event, args):
    if _WATCH["roots"] is None:
        return
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                  (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and _under(path):
            _WATCH["events"].append((event, path))
    elif event in _CHANGE_EVENTS and any(_under(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
        _WATCH["events"].append((event, args))


sys.addaudithook(_audit)  # cannot be removed: it does nothing outside `no_writes`


def _snapshot(folder) -> dict:
    """Every entry under folder: links as their targets, files as their hash, mode and mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[p] = ("dir", st.st_mode)
            else:
                with open(p, "rb") as f:
                    out[p] = ("file", hashlib.sha256(f.read()).hexdigest(), st.st_mode, st.st_mtime_ns)
    return out


@contextmanager
def no_writes(*folders):
    """Fails if anything tried to write under the folders, or if they differ afterwards."""
    before = {f: _snapshot(f) for f in folders}
    _WATCH["roots"], _WATCH["events"] = [os.path.realpath(f) for f in folders], []
    try:
        yield
    finally:
        events, _WATCH["roots"] = _WATCH["events"], None
    assert events == [], f"write attempts in {folders}: {events}"
    for f in folders:
        assert _snapshot(f) == before[f], f"{f} changed"


def _image():
    rng = np.random.default_rng(5)
    return Image.fromarray((rng.random((100, 120, 3)) * 255).astype(np.uint8))


def _numbers(m: QwenVLInference):
    """Greedy tokens of one answer and the logits of every prompt position."""
    img = _image()
    m.inference_image(img, PROMPT, max_tokens=6)
    tokens = list(m.last_token_ids)
    inputs = m.prompts.encode([{"type": "image"}, {"type": "text", "text": PROMPT}], {"images": [load_image(img)]})
    m.model.model.rope_deltas = None
    out = m.model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                  image_grid_thw=inputs["image_grid_thw"], use_cache=False, return_dict=True)
    return tokens, out.logits.astype("float32").numpy()


def _load(path, **kw):
    with no_writes(path):
        return QwenVLInference(str(path), dtype="float32", verbose=False, **kw)


@pytest.fixture(scope="module")
def make(tmp_path_factory):
    """make(layout=..., tie=..., dtype=..., single_file=...) -> folder, each written once."""
    made = {}

    def _make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in made:
            name = "-".join(f"{k}={v}" for k, v in key) or "hub"
            made[key] = make_tiny_checkpoint(str(tmp_path_factory.mktemp(name)), **kw)
        return made[key]
    return _make


@pytest.fixture(scope="module")
def reference(make):
    """The official (hub) layout's numbers, per (tie, file dtype)."""
    cache = {}

    def _ref(tie=False, dtype="float32"):
        if (tie, dtype) not in cache:
            cache[(tie, dtype)] = _numbers(_load(make(layout="hub", tie=tie, dtype=dtype)))
        return cache[(tie, dtype)]
    return _ref


# ----------------------------------------------------------------------------- every layout, same numbers

LAYOUTS = [
    # (layout, tie, dtype in the files, single file)
    ("transformers4", False, "float32", False),
    ("transformers5", False, "float32", False),
    ("transformers5", True, "float32", False),  # tied: lost in the nested text_config before
    ("transformers4", True, "float32", True),
    ("hub", False, "float32", True),  # one model.safetensors, no index
    ("transformers5", False, "bfloat16", True),
    ("transformers4", False, "float16", False),
]


@pytest.mark.parametrize("layout,tie,dtype,single", LAYOUTS,
                         ids=[f"{l}-{'tied' if t else 'untied'}-{d}-{'single' if s else 'sharded'}"
                              for l, t, d, s in LAYOUTS])
def test_layout_gives_the_official_layouts_numbers(make, reference, layout, tie, dtype, single):
    path = make(layout=layout, tie=tie, dtype=dtype, single_file=single)
    m = _load(path)
    tokens, logits = _numbers(m)
    # the stats say which layout was found
    files = "1 file(s)" if single else "2 file(s)"
    assert m.stats["checkpoint"] == (f"{layout} layout, {'tied' if tie else 'untied'} embeddings, {dtype} tensors "
                                     f"in {files}"), m.stats["checkpoint"]
    ref_tokens, ref_logits = reference(tie, dtype)
    assert tokens == ref_tokens
    np.testing.assert_array_equal(logits, ref_logits)


def test_tied_and_untied_differ(reference):
    """The comparison can tell: a lost tie (lm_head left random or taken from the embeddings
    when it should not be) changes the numbers."""
    assert not np.array_equal(reference(True)[1], reference(False)[1])


def test_rounded_files_are_close_to_float32(reference):
    """bfloat16 and float16 files hold rounded weights: their numbers are close to, not equal to,
    the float32 file's (so the per-dtype comparisons above compare like with like)."""
    for dtype in ("bfloat16", "float16"):
        _, logits = reference(False, dtype)
        assert not np.array_equal(logits, reference(False)[1])
        np.testing.assert_allclose(logits, reference(False)[1], atol=0.5)


@pytest.mark.parametrize("file_dtype,dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                              ("float16", "float32"), ("bfloat16", "bfloat16"),
                                              ("float32", "bfloat16")])
def test_weights_equal_paddleformers_own_loader(make, tmp_path, file_dtype, dtype):
    """Our conversion (names, transposes, q/k/v and gate/up fusion, casts) against paddleformers'
    from_pretrained(convert_from_hf=True) on a copy (it writes a metadata file into the folder)."""
    from paddleformers.transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    src = make(layout="hub", dtype=file_dtype)
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    cfg = Qwen2_5_VLConfig.from_pretrained(str(copy))
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(copy), config=cfg, convert_from_hf=True,
                                                                 dtype=dtype).state_dict()
    with no_writes(src):
        ckpt = inspect_checkpoint(src)
        ours = build_model(ckpt, paddle_config(ckpt), dtype).state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype, k
        a, b = (t.astype("float32").numpy() for t in (ours[k], theirs[k]))  # bfloat16 widens exactly
        assert np.array_equal(a, b), k


def test_configs_of_all_layouts_agree(make):
    """hub_config turns each layout's config.json into the official one (tie and rope included)."""
    def cfg(**kw):
        with open(os.path.join(make(**kw), "config.json")) as f:
            c = hub_config(json.load(f))
        return {k: v for k, v in c.items() if k not in ("transformers_version",)}

    for tie in (False, True):
        hub = cfg(layout="hub", tie=tie)
        assert hub["tie_word_embeddings"] is tie
        for layout in ("transformers4", "transformers5"):
            other = cfg(layout=layout, tie=tie)
            for k, v in hub.items():
                if k == "sliding_window" and not hub["use_sliding_window"]:
                    continue  # transformers 5 writes null when it is off
                if k == "vision_config":
                    assert {x: other[k].get(x) for x in v} == v
                else:
                    assert other.get(k) == v, (layout, k)


def test_tie_is_read_where_each_transformers_version_keeps_it():
    """4.5x may write tie_word_embeddings: false at the top for a tied model (its text_config holds
    the real value); 5 writes it only at the top."""
    base = {"model_type": "qwen2_5_vl", "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "vision_config": {}}
    v4 = {**base, "transformers_version": "4.55.4", "tie_word_embeddings": False,
          "text_config": {"tie_word_embeddings": True, "hidden_size": 16, "image_token_id": None}}
    v5 = {**base, "transformers_version": "5.3.0", "tie_word_embeddings": True, "image_token_id": 7,
          "text_config": {"hidden_size": 16, "image_token_id": None}}
    assert hub_config(v4)["tie_word_embeddings"] is True
    assert hub_config(v5)["tie_word_embeddings"] is True
    assert hub_config(v5)["image_token_id"] == 7  # a null in text_config does not win
    assert "pad_token_id" not in hub_config({**v4, "text_config": {**v4["text_config"], "pad_token_id": 3}})


# ----------------------------------------------------------------------------- never written to

def test_hub_cache_snapshot_of_symlinks_is_not_written(tiny_model_dir, tmp_path):
    """The layout huggingface_hub leaves: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--Qwen--Qwen2.5-VL-tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in os.listdir(tiny_model_dir):
        data = open(os.path.join(tiny_model_dir, name), "rb").read()
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        os.symlink(os.path.join("..", "..", "blobs", digest), snap / name)
    with no_writes(repo):
        m = QwenVLInference(str(snap), dtype="float32", verbose=False, cache_dir=str(tmp_path / "cache"))
    assert m.inference_image(_image(), PROMPT, max_tokens=2) is not None


def _inside(path, *folders) -> bool:
    real = os.path.realpath(path)
    return any(real == str(f) or real.startswith(str(f) + os.sep) for f in map(os.path.realpath, folders))


def _make_read_only(*folders):
    for folder in folders:
        for dirpath, _, filenames in os.walk(folder):
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o444)
            os.chmod(dirpath, 0o555)


def test_read_only_folder_and_read_only_cache_dir_answer(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Issue 11, item 5: this ended in an OSError traceback from the code that mirrored read-only
    folders into --cache-dir. Now nothing is written to either: the CLI answers, exit 0.
    (Root may write anyway, so os.access answers as for a non-root user, and the audit hook
    fails the test on any attempt to write.)"""
    model, cache = tmp_path / "model", tmp_path / "cache"
    shutil.copytree(tiny_model_dir, model)
    cache.mkdir()
    img = tmp_path / "img.png"
    _image().save(img)
    _make_read_only(model, cache)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode & os.W_OK and _inside(p, model, cache)
                        else real_access(p, mode, **kw))
    try:
        with no_writes(model, cache):
            rc = cli.main(["--model", str(model), "--cache-dir", str(cache), "--input", str(img), "--prompt", PROMPT,
                           "--max-tokens", "3", "--dtype", "float32", "--json"])
    finally:
        for folder in (model, cache):
            for dirpath, _, _ in os.walk(folder):
                os.chmod(dirpath, 0o755)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err and json.loads(out)["answer"] is not None


# ----------------------------------------------------------------------------- damaged checkpoints: one line

def _broken_copy(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    return broken


def _truncate(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])


def _bad_header(folder):
    shard = folder / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"<html>oops!!"  # e.g. an error page saved under the shard's name
    shard.write_bytes(bytes(data))


def _index_names_missing_file(folder):
    index = folder / "model.safetensors.index.json"
    cfg = json.loads(index.read_text())
    key = next(iter(cfg["weight_map"]))
    cfg["weight_map"][key] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps(cfg))


def _shard_missing(folder):
    os.remove(folder / "model-00002-of-00002.safetensors")


def _tiny_header(folder):
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\x05")


@pytest.mark.parametrize("damage,words", [
    (_truncate, "damaged: it is cut short"),
    (_bad_header, "damaged: its header is not safetensors JSON"),
    (_tiny_header, "damaged: its header is missing or cut short"),
    (_index_names_missing_file, "names model-00003-of-00003.safetensors, which is missing"),
    (_shard_missing, "which is missing"),
], ids=["truncated", "wrong-header", "four-byte-file", "index-names-missing-file", "shard-deleted"])
def test_damaged_checkpoint_is_one_error_line(tiny_model_dir, tmp_path, capsys, damage, words):
    broken = _broken_copy(tiny_model_dir, tmp_path)
    damage(broken)
    img = tmp_path / "img.png"
    _image().save(img)
    rc = cli.main(["--model", str(broken), "--input", str(img), "--prompt", PROMPT, "--dtype", "float32",
                   "--max-tokens", "2", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert "Traceback" not in err


def test_weights_of_another_size_name_the_mismatch(tiny_model_dir, tmp_path):
    broken = _broken_copy(tiny_model_dir, tmp_path)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="does not fit config.json"):
        QwenVLInference(str(broken), dtype="float32", verbose=False)


def test_out_of_memory_while_loading_is_one_line(tiny_model_dir, monkeypatch):
    import qwen_vl_psa.checkpoint as checkpoint

    def no_memory(*a, **kw):
        raise MemoryError()
    monkeypatch.setattr(checkpoint, "load_weights", no_memory)
    with pytest.raises(ModelLoadError, match=r"not enough memory to load the model .*GiB of weights"):
        QwenVLInference(tiny_model_dir, dtype="float32", verbose=False)


def test_untied_config_without_lm_head_is_named(make, tmp_path):
    broken = tmp_path / "t"
    shutil.copytree(make(layout="transformers5", tie=True), broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="no lm_head.weight"):
        QwenVLInference(str(broken), dtype="float32", verbose=False)


# ----------------------------------------------------------------------------- other architectures

@pytest.mark.parametrize("model_type,arch,found", [
    ("qwen2_vl", "Qwen2VLForConditionalGeneration", "holds Qwen2-VL"),
    ("qwen3_vl", "Qwen3VLForConditionalGeneration", "holds Qwen3-VL"),
    ("qwen2", "Qwen2ForCausalLM", "holds a text-only Qwen2 / Qwen2.5 model"),
    ("llava", "LlavaForConditionalGeneration", "holds model_type 'llava'"),
])
def test_other_architecture_is_one_line(tiny_model_dir, tmp_path, model_type, arch, found):
    other = _broken_copy(tiny_model_dir, tmp_path)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update({"model_type": model_type, "architectures": [arch]})
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        QwenVLInference(str(other), dtype="float32", verbose=False)
    msg = str(e.value)
    assert found in msg and "runs Qwen2.5-VL" in msg and "\n" not in msg


def test_quantized_checkpoint_is_one_line(tiny_model_dir, tmp_path):
    other = _broken_copy(tiny_model_dir, tmp_path)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"quantized Qwen2.5-VL \(awq\).*unquantized model"):
        QwenVLInference(str(other), dtype="float32", verbose=False)
    del cfg["quantization_config"]  # int tensors without the config: named by the file check
    (other / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import save_file
    save_file({"visual.x.qweight": np.zeros((4, 4), np.int32)}, str(other / "model-00002-of-00002.safetensors"))
    with pytest.raises(ModelLoadError, match="is I32: only BF16, F16 and F32"):
        QwenVLInference(str(other), dtype="float32", verbose=False)


def test_vision_less_weights_are_named(tiny_model_dir, tmp_path):
    """A qwen2_5_vl config over a text-only model's weights."""
    other = _broken_copy(tiny_model_dir, tmp_path)
    for name in os.listdir(other):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(other / name)
    from safetensors.numpy import save_file
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(other / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="no vision encoder"):
        QwenVLInference(str(other), dtype="float32", verbose=False)
