"""QwenVLInference on the tiny checkpoint: the processor, generation and stats, through `--model DIR`."""
import json
import os
import shutil

import numpy as np
import paddle
import pytest
from PIL import Image

from infer_qwen2_5_vl_psa import QwenVLInference
from qwen_vl_psa.errors import InputError, ModelLoadError
from qwen_vl_psa.media import load_image
from qwen_vl_psa.report import format_stats


def _image(seed=0, size=(120, 100)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


# ---------------------------------------------------------------- processor

def test_image_placeholder_expands_to_grid_tokens(model):
    img = _image(size=(112, 84))  # already a multiple of 28: grid 6 x 8 patches of 14
    inputs = model.prompts.encode([{"type": "image"}, {"type": "text", "text": "hi"}], {"images": [img]})
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 84 // 14, 112 // 14)
    n_pad = int((inputs["input_ids"][0] == model.model.config.image_token_id).sum())
    assert n_pad == t * h * w // 4  # 2x2 patches merge into one token
    assert inputs["pixel_values"].shape == [t * h * w, 3 * 2 * 14 * 14]


def test_video_grid_follows_frames(model):
    frames = (np.random.default_rng(0).random((6, 56, 84, 3)) * 255).astype(np.uint8)
    inputs = model.prompts.encode([{"type": "video"}, {"type": "text", "text": "hi"}], {"videos": [frames], "fps": 2.0})
    assert inputs["video_grid_thw"][0].tolist() == [3, 4, 6]  # 6 frames / temporal patch 2
    assert float(inputs["second_per_grid_ts"][0]) == pytest.approx(1.0)  # 2 frames at 2 fps
    n_pad = int((inputs["input_ids"][0] == model.model.config.video_token_id).sum())
    assert n_pad == 3 * 4 * 6 // 4


def test_video_stats_give_frame_size_as_width_x_height(model):
    from qwen_vl_psa.media import Video

    frames = (np.random.default_rng(1).random((4, 56, 84, 3)) * 255).astype(np.uint8)  # 56 high, 84 wide
    video = Video(frames=frames, sample_fps=2.0, source_fps=2.0, total_frames=4, frame_indices=[0, 1, 2, 3],
                  duration_s=2.0)
    model.inference_video(video, "hi", max_tokens=2)
    assert model.stats["frame_size"] == [56, 84]  # [height, width], as the frame arrays
    assert "4 frames of 84x56 at 2.00 fps" in format_stats(model.stats)


def test_chat_template_puts_media_before_prompt(model):
    text = model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}],
        tokenize=False, add_generation_prompt=True)
    assert text.index("<|vision_start|><|image_pad|><|vision_end|>") < text.index("Describe")
    assert text.endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- generation

def test_greedy_is_deterministic(model):
    img = _image(1)
    a = model.inference_image(img, "Describe this image.", max_tokens=12)
    ids_a = list(model.last_token_ids)
    b = model.inference_image(img, "Describe this image.", max_tokens=12)
    assert a == b and ids_a == model.last_token_ids and len(ids_a) > 0


def test_different_images_give_different_answers(model):
    model.inference_image(_image(1), "Describe this image.", max_tokens=8)
    ids_a = list(model.last_token_ids)
    model.inference_image(_image(2, size=(60, 200)), "Describe this image.", max_tokens=8)
    assert ids_a != model.last_token_ids


def test_kv_cache_generation_equals_argmax_of_full_forward(model):
    img = _image(3)
    model.inference_image(img, "What is in the picture?", max_tokens=8)
    gen = list(model.last_token_ids)
    inputs = model.prompts.encode([{"type": "image"}, {"type": "text", "text": "What is in the picture?"}],
                           {"images": [load_image(img)]})  # resized as inference_image does
    prompt = inputs["input_ids"]
    full = paddle.concat([prompt, paddle.to_tensor([gen], dtype=prompt.dtype)], axis=1)
    model.model.model.rope_deltas = None
    out = model.model(input_ids=full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                      use_cache=False, return_dict=True)
    n = prompt.shape[1]
    argmax = paddle.argmax(out.logits[0, n - 1:n - 1 + len(gen)], axis=-1).tolist()
    assert argmax == gen


def test_sampling_with_seed_repeats_and_differs_from_greedy(model):
    img = _image(4)
    kw = dict(max_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    a = model.inference_image(img, "Describe.", **kw)
    b = model.inference_image(img, "Describe.", **kw)
    assert a == b
    greedy = model.inference_image(img, "Describe.", max_tokens=10)
    c = model.inference_image(img, "Describe.", **{**kw, "seed": 8})
    assert len({a, greedy, c}) > 1


def test_streaming_callback_gets_the_answer_in_pieces(model):
    pieces = []
    answer = model.inference_image(_image(5), "Describe.", max_tokens=10, stream=pieces.append)
    assert "".join(pieces) == answer and len(pieces) > 1


def test_multi_image_counts_both_images(model):
    model.inference_multi_image([_image(1, (56, 56)), _image(2, (112, 56))], "Compare.", max_tokens=4)
    assert model.stats["input_tokens"]["image"] == 4 + 8  # one token per 28x28 pixels
    one = model.stats["input_tokens"]["image"]
    model.inference_image(_image(1, (56, 56)), "Compare.", max_tokens=4)
    assert model.stats["input_tokens"]["image"] < one


def test_stats_fields_come_from_real_timers(model):
    model.inference_image(_image(6), "Describe this image.", max_tokens=6)
    s = model.stats
    for key in ("model_load_s", "preprocess_s", "vision_encoder_s", "prefill_s", "time_to_first_token_s",
                "decode_s", "peak_memory_mb"):
        assert isinstance(s[key], float) and s[key] > 0, key
    assert s["time_to_first_token_s"] >= s["prefill_s"] + s["vision_encoder_s"]
    tok = s["input_tokens"]
    assert tok["total"] == tok["text"] + tok["image"] + tok["video"] and tok["image"] > 0 and tok["video"] == 0
    assert 1 <= s["output_tokens"] <= 6 and s["memory_kind"] == "process_rss"
    text = format_stats(s)
    for word in ("model load", "vision encoder", "prefill", "decode", "input tokens", "peak memory"):
        assert word in text
    json.dumps(s)  # --json needs it serialisable


def test_max_tokens_bounds_output(model):
    model.inference_image(_image(7), "Describe.", max_tokens=3)
    assert model.stats["output_tokens"] <= 3


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, words", [
    (dict(max_tokens=0), "--max-tokens"),
    (dict(temperature=-1.0), "--temperature"),
    (dict(top_p=0.0), "--top-p"),
])
def test_bad_generation_options(model, kw, words):
    with pytest.raises(InputError, match=words):
        model.inference_image(_image(), "Describe.", **kw)


def test_empty_prompt(model):
    with pytest.raises(InputError, match="prompt is empty"):
        model.inference_image(_image(), "   ")


def test_context_overflow_names_the_fix(tiny_model_dir, tmp_path):
    small = tmp_path / "small_ctx"
    shutil.copytree(tiny_model_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (small / "config.json").write_text(json.dumps(cfg))
    m = QwenVLInference(str(small), dtype="float32", verbose=False)
    with pytest.raises(InputError, match="context.*lower --max-pixels"):
        m.inference_image(_image(size=(448, 448)), "Describe.")


@pytest.mark.parametrize("remove, words", [("config.json", "no config.json"),
                                           ("weights", "no \\*.safetensors")])
def test_model_folder_without_config_or_weights(tiny_model_dir, tmp_path, remove, words):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    for name in os.listdir(broken):
        if name == remove or (remove == "weights" and name.endswith(".safetensors")):
            os.remove(broken / name)
    with pytest.raises(ModelLoadError, match=words):
        QwenVLInference(str(broken), dtype="float32", verbose=False)


def test_not_a_model_id(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a folder nor a hub id"):
        QwenVLInference(str(tmp_path / "missing" / "x" / "y"), verbose=False)


def test_read_only_model_folder_loads(tiny_model_dir, model, tmp_path, monkeypatch):
    # Nothing is written to the model folder, so a read-only one loads as it is (CI runs as root,
    # so the folder is made to look read-only; test_checkpoints.py checks no write is attempted).
    ro = tmp_path / "ro"
    shutil.copytree(tiny_model_dir, ro)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    before = sorted(os.listdir(ro))
    m = QwenVLInference(str(ro), dtype="float32", verbose=False, cache_dir=str(tmp_path / "cache"))
    # the same weights as the shared model: the same answer
    assert m.inference_image(_image(), "Describe.", max_tokens=2) == model.inference_image(_image(), "Describe.",
                                                                                            max_tokens=2)
    assert sorted(os.listdir(ro)) == before


# ---------------------------------------------------------------- hub ids (offline: a pre-filled cache)

def _fill_hf_cache(cache, repo_id, src):
    """The layout huggingface_hub leaves after a download: models--org--name/{refs,snapshots}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(src, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snap


@pytest.fixture
def hf_offline(monkeypatch):
    """huggingface_hub reads HF_HUB_OFFLINE at import: flip its constant so no request leaves."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_id_resolves_through_the_hub_cache(tiny_model_dir, model, tmp_path, hf_offline):
    snap = _fill_hf_cache(tmp_path / "cache", "tiny-org/Tiny-VL", tiny_model_dir)
    m = QwenVLInference("tiny-org/Tiny-VL", dtype="float32", verbose=False, cache_dir=str(tmp_path / "cache"))
    assert os.path.samefile(m.model_dir, snap)
    assert m.inference_image(_image(), "Describe.", max_tokens=2) == model.inference_image(_image(), "Describe.",
                                                                                            max_tokens=2)


def test_hub_id_that_cannot_be_fetched_is_one_clear_error(tmp_path, hf_offline):
    with pytest.raises(ModelLoadError, match="cannot download 'nobody/Missing-VL' from huggingface"):
        QwenVLInference("nobody/Missing-VL", verbose=False, cache_dir=str(tmp_path))
