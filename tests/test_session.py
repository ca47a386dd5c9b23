"""Several questions about one video: the media prefix is encoded and prefilled once, and every
answer equals the answer of a cold single-question run (tiny checkpoint, CPU)."""
import gc
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import paddle
import pytest
from paddleformers.transformers.cache_utils import DynamicCache
from PIL import Image

import infer_qwen2_5_vl_psa as cli
from psa_paddle import AttentionConfig
from qwen_vl_psa import engine, session
from qwen_vl_psa import psa_router as router
from qwen_vl_psa.errors import InputError, SessionClosedError
from qwen_vl_psa.generation import prefill
from qwen_vl_psa.media import Video
from qwen_vl_psa.prompt import template_parts
from qwen_vl_psa.report import format_session_stats, format_stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = ["What happens in the video?", "Who is speaking?", "Describe this video in detail."]
# PSA on the tiny model's ~660 tokens: blocks of 64, no minimum length. text_length 0 is the case
# where caching the whole prefix would change the answer (a straddling block's estimate); 64 forces
# the last block of a one-shot prompt to full resolution, which the prefix alone cannot know.
PSA_CONFIGS = {
    "dense": None,
    "psa-text0": AttentionConfig(query_block=64, min_seq_len=0, text_length=0),
    "psa-text64": AttentionConfig(query_block=64, min_seq_len=0, text_length=64),
}


@pytest.fixture(scope="module")
def video():
    # smooth frames, like a real recording (as tests/test_psa_model.py): 16 frames -> ~640 video tokens
    t, y, x = np.meshgrid(np.arange(16), np.arange(224), np.arange(280), indexing="ij")
    frames = np.stack([np.sin(x / 17 + t / 3), np.cos(y / 13 - t / 5), np.sin((x + y) / 29)], axis=-1)
    frames = ((frames + 1) * 127).astype(np.uint8)
    return Video(frames=frames, sample_fps=2.0, source_fps=2.0, total_frames=16, frame_indices=list(range(16)),
                 duration_s=8.0)


@pytest.fixture
def psa(model, request):
    """Turn PSA on with the parametrised config for one test, off afterwards."""
    cfg = PSA_CONFIGS[request.param]
    if cfg is not None:
        model.enable_psa(cfg)
    yield cfg
    model.disable_psa()


@pytest.fixture
def prefills(monkeypatch):
    """Every language-model prefill call of multi-token input: [(query length, last logits)]."""
    calls = []
    real = prefill

    def spy(model, embeds, pos, cache):
        logits = real(model, embeds, pos, cache)
        if embeds.shape[1] > 1:
            calls.append((embeds.shape[1], logits.numpy()))
        return logits

    for module in (engine, session):  # the two callers of prefill
        monkeypatch.setattr(module, "prefill", spy)
    return calls


def _media(video):
    return {"videos": [video.frames], "fps": video.sample_fps}


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((84, 112, 3)) * 255).astype(np.uint8)),
            Image.fromarray((rng.random((56, 56, 3)) * 255).astype(np.uint8))]


# ---------------------------------------------------------------- the prompt split

def test_prefix_and_question_tokenised_apart_give_the_whole_ids(model, video):
    tok = model.tokenizer
    parts = template_parts(model.prompts, [{"type": "video"}])
    assert parts.prefix.endswith("<|vision_end|>") and parts.question_tail == "<|im_end|>\n<|im_start|>assistant\n"
    assert parts.turn_separator == "<|im_end|>\n<|im_start|>user\n"
    for q in QUESTIONS + ["  spaces, <|im_end|> and ünïcödé  "]:
        whole = model.prompts.encode([{"type": "video"}, {"type": "text", "text": q}], _media(video))
        whole = whole["input_ids"][0].tolist()
        prefix = model.prompts.encode_text(parts.prefix, _media(video))["input_ids"][0].tolist()
        suffix = tok(q + parts.question_tail, add_special_tokens=False)["input_ids"]
        assert prefix + suffix == whole
        assert prefix[-1] == tok.convert_tokens_to_ids("<|vision_end|>")


# ---------------------------------------------------------------- same answers as cold runs

@pytest.mark.parametrize("psa", list(PSA_CONFIGS), indirect=True)
def test_session_answers_equal_fresh_single_question_runs(model, video, psa, prefills, monkeypatch):
    psa_calls = []
    real_psa = router.psa_attention

    def psa_spy(q, k, *a, q_offset=None, **kw):
        psa_calls.append((q.shape[2], k.shape[2], q_offset))
        return real_psa(q, k, *a, q_offset=q_offset, **kw)

    monkeypatch.setattr(router, "psa_attention", psa_spy)
    cold = []
    for q in QUESTIONS:
        prefills.clear()
        model.inference_video(video, q, max_tokens=8)
        cold.append((list(model.last_token_ids), prefills[-1][1], model.stats["input_tokens"]))
    psa_calls.clear()
    with model.open_video(video) as s:
        for q, (ids, logits, tokens) in zip(QUESTIONS, cold):
            prefills.clear()
            s.ask(q, max_tokens=8)
            assert model.last_token_ids == ids, q
            # the question's prefill continues the cached prefix and gives the cold run's logits
            np.testing.assert_allclose(prefills[-1][1], logits, rtol=0, atol=1e-5)
            assert model.stats["input_tokens"] == tokens
    if psa is None:
        assert s.cached_tokens == s.prefix_tokens and not psa_calls
    else:
        assert 0 < s.cached_tokens < s.prefix_tokens and s.cached_tokens % psa.query_block == 0
        assert model.stats["psa"]["calls"] > 0
        # each question's prefill: query length < key length, q_offset = the cached prefix
        n_layers = len(model.model.model.language_model.layers)
        question_calls = psa_calls[n_layers:]  # after the prefix prefill's
        assert len(question_calls) == 3 * n_layers
        assert all(lq < lk and off == s.cached_tokens == lk - lq for lq, lk, off in question_calls)


# ---------------------------------------------------------------- the prefix is paid for once

@pytest.mark.parametrize("psa", ["dense", "psa-text64"], indirect=True)
def test_vision_encoder_and_prefix_prefill_run_once(model, video, psa, prefills, monkeypatch):
    core = model.model.model
    encoder_calls = []
    real = core.get_video_features
    monkeypatch.setattr(core, "get_video_features", lambda *a, **k: encoder_calls.append(1) or real(*a, **k))
    s = model.open_video(video)
    assert not encoder_calls and not prefills  # opening loads the media only
    for q in QUESTIONS:
        s.ask(q, max_tokens=4)
    assert len(encoder_calls) == 1
    assert [n for n, _ in prefills].count(s.cached_tokens) == 1
    question_lens = [n for n, _ in prefills if n != s.cached_tokens]
    assert len(question_lens) == 3 and max(question_lens) < 40 + s.prefix_tokens - s.cached_tokens
    reuse = [t["stats"]["reuse"] for t in s.turns]
    assert [r["hit"] for r in reuse] == [False, True, True] and reuse[-1]["hits"] == 2
    assert [t["stats"]["vision_encoder_s"] > 0 for t in s.turns] == [True, False, False]
    st = s.stats
    assert st["questions"] == 3 and st["reuse_hits"] == 2 and st["prefix_tokens"] == s.prefix_tokens
    assert st["time_saved_s"] == pytest.approx(2 * (st["vision_encoder_s"] + st["prefix_prefill_s"]))
    assert st["vision_encoder_s"] > 0 and st["prefix_prefill_s"] > 0
    assert "reused" in format_stats(s.turns[1]["stats"]) and "reuse hits" in format_session_stats(st)
    json.dumps(st), json.dumps(s.turns[-1]["stats"])
    s.close()


# ---------------------------------------------------------------- independent and conversation

def test_independent_questions_see_only_the_media(model, video):
    with model.open_video(video) as s:
        s.ask(QUESTIONS[0], max_tokens=6)
        s.ask(QUESTIONS[1], max_tokens=6)
        cold = model.prompts.encode([{"type": "video"}, {"type": "text", "text": QUESTIONS[1]}], _media(video))
        assert s.prompt_ids == cold["input_ids"][0].tolist()
        assert s._cache.get_seq_length() == s.cached_tokens  # rewound after each answer


def test_conversation_turn_two_sees_turn_one(model, video, prefills):
    tok = model.tokenizer
    with model.open_video(video, conversation=True) as s:
        s.ask(QUESTIONS[0], max_tokens=6)
        answer1 = list(model.last_token_ids)
        assert model.stats["stopped_by"] == "max_tokens"  # so the answer's last token is fed with turn 2
        prefills.clear()
        s.ask(QUESTIONS[1], max_tokens=6)
        turn2_logits = prefills[-1][1]
        parts = template_parts(model.prompts, [{"type": "video"}])
        expected = (s.prefix_ids + tok(QUESTIONS[0] + parts.question_tail, add_special_tokens=False)["input_ids"]
                    + answer1 + tok(parts.turn_separator + QUESTIONS[1] + parts.question_tail,
                                    add_special_tokens=False)["input_ids"])
        assert s.prompt_ids == expected
        # ... which is the full two-turn chat template, tokenised
        history = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTIONS[0]}]},
                   {"role": "assistant", "content": tok.decode(answer1, skip_special_tokens=False)}]
        text = model.prompts.chat_text([{"type": "text", "text": QUESTIONS[1]}], history=history)
        n_video = s.prefix_ids.count(model.model.config.video_token_id)
        text = text.replace("<|video_pad|>", "<|video_pad|>" * n_video)
        assert tok.decode(s.prompt_ids, skip_special_tokens=False) == text
        assert s._cache.get_seq_length() >= len(s.prompt_ids)  # the conversation stays cached
        assert s.turns[1]["stats"]["reuse"]["mode"] == "conversation"

    # turn 2's prefill gives the logits of one cold prefill over the whole two-turn prompt
    inputs = model.prompts.encode_text(parts.prefix, _media(video))
    inputs["input_ids"] = paddle.to_tensor([expected], dtype="int64")
    del inputs["attention_mask"]  # the prefix's
    assert not set(answer1) & {model.model.config.video_token_id, model.model.config.image_token_id}
    embeds = model.prompts.embed(inputs)
    pos, _ = model.prompts.positions(inputs)
    cold = prefill(model.model, embeds, pos, DynamicCache(config=model.model.config.text_config))
    np.testing.assert_allclose(turn2_logits, cold.numpy(), rtol=0, atol=1e-5)


def test_open_images_answers_equal_inference_multi_image(model):
    images = _images()
    cold = []
    for q in QUESTIONS[:2]:
        model.inference_multi_image(images, q, max_tokens=6)
        cold.append(list(model.last_token_ids))
    with model.open_images(images) as s:
        for q, ids in zip(QUESTIONS[:2], cold):
            s.ask(q, max_tokens=6)
            assert model.last_token_ids == ids
        assert s.stats["media"] == "images" and s.stats["reuse_hits"] == 1


def test_session_keeps_the_psa_setting_it_was_opened_with(model, video):
    with model.open_video(video) as s:
        model.enable_psa(PSA_CONFIGS["psa-text0"])
        try:
            s.ask(QUESTIONS[0], max_tokens=2)
            assert "psa" not in model.stats
            assert model.attention.config is PSA_CONFIGS["psa-text0"]  # restored after the question
        finally:
            model.disable_psa()


# ---------------------------------------------------------------- memory and life cycle

def test_closed_session_releases_its_cache_and_refuses_questions(model, video):
    s = model.open_video(video)
    s.ask(QUESTIONS[0], max_tokens=3)
    cache = s._cache
    assert cache.get_seq_length() == s.cached_tokens > 0
    cache_ref, keys_ref = weakref.ref(cache), weakref.ref(cache.layers[0].keys)
    s.close()
    assert cache.get_seq_length() == 0  # even a kept reference holds no tensors
    del cache
    gc.collect()
    assert cache_ref() is None and keys_ref() is None
    assert s.stats["closed"] and s.stats["cache_tokens"] == 0
    with pytest.raises(SessionClosedError, match="session is closed"):
        s.ask(QUESTIONS[1])

    with model.open_video(video) as s2:
        s2.ask(QUESTIONS[0], max_tokens=2)
        ref = weakref.ref(s2._cache)
    gc.collect()
    assert s2.closed and ref() is None
    with pytest.raises(SessionClosedError):
        s2.ask(QUESTIONS[0])


def test_bad_questions(model, video):
    with model.open_video(video) as s:
        with pytest.raises(InputError, match="prompt is empty"):
            s.ask("  ")
        with pytest.raises(InputError, match="--max-tokens"):
            s.ask("Why?", max_tokens=0)
        s.ask("Why?", max_tokens=2)  # still usable


# ---------------------------------------------------------------- command line

@pytest.mark.slow
def test_cli_two_prompts_stream_each_answer_with_its_stats(tiny_model_dir, sample_video_path, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "infer_qwen2_5_vl_psa.py"), "--model", tiny_model_dir,
                        "--input", str(sample_video_path), "--fps", "2", "--max-tokens", "5",
                        "--prompt", "What happens?", "--prompt", "Who is there?", "--cache-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "### question 1/2: What happens?"
    assert "### question 2/2: Who is there?" in lines[1:]
    assert r.stderr.count("---- stats ----") == 2 and "---- session ----" in r.stderr
    assert "reused" in r.stderr and "reuse hits 1" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("mode", ["independent", "conversation"])
def test_cli_prompts_file_json(tiny_model_dir, sample_video_path, tmp_path, capsys, mode):
    qfile = tmp_path / "questions.txt"
    qfile.write_text("What happens?\n\nWho is there?\n")
    base = ["--model", tiny_model_dir, "--input", str(sample_video_path), "--fps", "2", "--max-tokens", "5",
            "--json", "--cache-dir", str(tmp_path)]
    argv = base + ["--prompts-file", str(qfile)] + (["--conversation"] if mode == "conversation" else [])
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"answers", "session"}
    assert [a["prompt"] for a in out["answers"]] == ["What happens?", "Who is there?"]
    assert out["answers"][1]["stats"]["reuse"]["hit"] and out["answers"][1]["stats"]["reuse"]["mode"] == mode
    assert out["session"]["reuse_hits"] == 1 and out["session"]["mode"] == mode
    # the first answer is the single-question answer
    assert cli.main(base + ["--prompt", "What happens?"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == out["answers"][0]["answer"]


def test_cli_empty_prompt_among_several(tiny_model_dir, sample_image_path, tmp_path, capsys):
    argv = ["--model", tiny_model_dir, "--input", str(sample_image_path), "--prompt", "Describe.",
            "--prompt", " ", "--cache-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: prompt 2 of 2 is empty" in err and "Traceback" not in err
