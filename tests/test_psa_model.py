"""PSA inside the tiny Qwen2.5-VL: routing, equivalence with dense attention, stats, decode untouched."""
import numpy as np
import pytest
from paddleformers.transformers.cache_utils import DynamicCache
from PIL import Image

from psa_paddle import AttentionConfig
from qwen_vl_psa.engine import QwenVLInference
from qwen_vl_psa.prompt import MediaInput
from qwen_vl_psa.psa_router import ROUTER, apply_psa, remove_psa
from qwen_vl_psa.report import format_stats

# Blocks of 64 so the tiny model's few hundred tokens span several blocks; min_seq_len 0 so PSA
# runs at all (its default keeps short prompts dense, where PSA cannot pay off).
ALL_FULL = AttentionConfig(query_block=64, mask_ratios={1: (0.0, 1.0)}, use_sim_cap=False, min_seq_len=0,
                           text_length=0)
DEFAULT_SMALL = AttentionConfig(query_block=64, min_seq_len=0, text_length=64)


@pytest.fixture
def video():
    # smooth frames, like a real recording: neighbouring tokens look alike
    t, y, x = np.meshgrid(np.arange(16), np.arange(224), np.arange(280), indexing="ij")
    frames = np.stack([np.sin(x / 17 + t / 3), np.cos(y / 13 - t / 5), np.sin((x + y) / 29)], axis=-1)
    return ((frames + 1) * 127).astype(np.uint8)


def _ask(model, frames, prompt="What happens?", n=8):
    media = MediaInput([{"type": "video"}], {"videos": [frames], "fps": 2.0}, kind="video")
    return model.ask(media, prompt, max_tokens=n)


def test_router_names_only_the_text_attention(model):
    cfg = model.model.config
    assert cfg.text_config._attn_implementation == ROUTER
    assert cfg.vision_config._attn_implementation != ROUTER


def test_all_level_one_psa_generates_the_dense_tokens(model, video):
    dense = _ask(model, video)
    dense_ids = list(model.last_token_ids)
    model.enable_psa(ALL_FULL)
    try:
        assert _ask(model, video) == dense and model.last_token_ids == dense_ids
        s = model.stats["psa"]
        assert s["calls"] == len(model.model.model.language_model.layers)  # one prefill call a layer
        assert s["sparsity"] == pytest.approx(0.0)
    finally:
        model.disable_psa()


def test_default_config_runs_and_reports_sparsity(model, video):
    model.enable_psa(DEFAULT_SMALL)
    try:
        _ask(model, video)
        s = model.stats["psa"]
        assert s["calls"] > 0 and 0.0 < s["sparsity"] < 1.0
        assert s["seq_len"] == model.stats["input_tokens"]["total"]
        assert sum(s["level_fractions"].values()) == pytest.approx(1.0)
        assert set(s["sparsity_by_layer"]) == {"0", "1"}
        assert s["estimate_s"] > 0 and s["attention_s"] > 0
        assert "sparsity" in format_stats(model.stats)
    finally:
        model.disable_psa()


def test_decode_steps_never_call_psa(model, video, monkeypatch):
    from qwen_vl_psa import psa_router as patch

    q_lens = []
    real = patch.psa_attention

    def spy(q, *a, **kw):
        q_lens.append(q.shape[2])
        return real(q, *a, **kw)

    monkeypatch.setattr(patch, "psa_attention", spy)
    model.enable_psa(DEFAULT_SMALL)
    try:
        _ask(model, video, n=6)
    finally:
        model.disable_psa()
    n_layers = len(model.model.model.language_model.layers)
    assert len(q_lens) == n_layers and min(q_lens) > 1
    assert model.attention.decode_calls == n_layers * (model.stats["output_tokens"] - 1 +
                                                       (model.stats["stopped_by"] == "eos"))


def test_short_prompt_stays_dense_with_default_min_seq_len(model):
    model.enable_psa(AttentionConfig())
    try:
        img = Image.fromarray(np.full((56, 56, 3), 200, np.uint8))
        model.inference_image(img, "Describe.", max_tokens=3)
        assert model.stats["psa"]["calls"] == 0 and model.stats["psa"]["dense_prefill_calls"] > 0
        assert "not used" in format_stats(model.stats)
    finally:
        model.disable_psa()


def _prefill_logits(model, embeds, pos, split=None):
    """Last-position logits of one prefill, or of a prefix prefill then the rest (cache continued)."""
    cache = DynamicCache(config=model.model.config.text_config)
    if split is None:
        out = model.model(inputs_embeds=embeds, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[:, -1]
    model.model(inputs_embeds=embeds[:, :split], position_ids=pos[:, :, :split], past_key_values=cache,
                use_cache=True)
    out = model.model(inputs_embeds=embeds[:, split:], position_ids=pos[:, :, split:], past_key_values=cache,
                      use_cache=True)
    return out.logits[:, -1]


@pytest.mark.parametrize("psa", [None, ALL_FULL], ids=["dense", "psa-all-level-1"])
def test_prefill_continuing_a_cache_equals_one_prefill(model, video, psa):
    """Query length < key length: the causal offset must follow the cached prefix."""
    inputs = model.prompts.encode([{"type": "video"}, {"type": "text", "text": "Where is the ball?"}],
                           {"videos": [video], "fps": 2.0})
    embeds = model.prompts.embed(inputs)
    pos, _ = model.prompts.positions(inputs)
    if psa:
        model.enable_psa(psa)
    try:
        whole = _prefill_logits(model, embeds, pos)
        split = _prefill_logits(model, embeds, pos, split=embeds.shape[1] - 37)
    finally:
        model.disable_psa()
    np.testing.assert_allclose(split.numpy(), whole.numpy(), rtol=1e-4, atol=1e-4)


def test_router_dense_equals_the_models_own_attention(model, video):
    inputs = model.prompts.encode([{"type": "video"}, {"type": "text", "text": "Describe."}],
                           {"videos": [video], "fps": 2.0})
    embeds = model.prompts.embed(inputs)
    pos, _ = model.prompts.positions(inputs)
    routed = _prefill_logits(model, embeds, pos)
    remove_psa(model.model)
    try:
        own = _prefill_logits(model, embeds, pos)
    finally:
        model.attention = apply_psa(model.model, None)
        model.disable_psa()
    np.testing.assert_allclose(routed.numpy(), own.numpy(), rtol=1e-4, atol=1e-4)


def test_apply_and_remove_psa_on_a_bare_model(tiny_model_dir):
    m = QwenVLInference(tiny_model_dir, dtype="float32", verbose=False)
    remove_psa(m.model)
    base = m.model.config.text_config._attn_implementation
    state = apply_psa(m.model, DEFAULT_SMALL)
    assert m.model.config.text_config._attn_implementation == ROUTER and state.config is DEFAULT_SMALL
    remove_psa(m.model)
    assert m.model.config.text_config._attn_implementation == base
    assert not hasattr(m.model.config.text_config, "_psa_state")
