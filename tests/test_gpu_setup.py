"""GPU set-up decided on the CPU: fused ops per dtype, the Paddle version line, the kernel warm-up."""
from __future__ import annotations

import types

import pytest

import psa_paddle.psa as psa_mod
from psa_paddle import AttentionConfig
from psa_paddle.versions import MIN_PADDLE, paddle_problem
from qwen_vl_psa.loading import configure_model, model_overrides


@pytest.mark.parametrize("device", ["gpu", "cpu"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_fused_ops_only_where_their_kernel_exists(device, dtype):
    """Paddle 3.3 registers the GPU fused_rms_norm_ext for float32, float64 and bfloat16 only,
    and no CPU kernel: float16 on a GPU and everything on a CPU take the unfused RMSNorm."""
    from paddleformers.transformers import Qwen2_5_VLConfig

    cfg = configure_model(Qwen2_5_VLConfig(), device, dtype)
    want_fused_norm = device == "gpu" and dtype in ("bfloat16", "float32")
    for c in (cfg, cfg.text_config, cfg.vision_config):
        assert c.get("fuse_rms_norm", True) is want_fused_norm, (device, dtype)
        assert c.get("fuse_swiglu", False) is False
        assert c._attn_implementation == ("sdpa" if device == "gpu" else "eager")


def test_every_fused_switch_of_the_model_path_is_decided():
    """The fused switches paddleformers' Qwen2.5-VL path reads (config.get("fuse_*")) are the
    ones model_overrides sets: a new one in a paddleformers upgrade fails here."""
    import inspect
    import re

    import paddleformers.nn.mlp as mlp
    import paddleformers.nn.norm as norm
    import paddleformers.transformers.qwen2_5_vl.modeling as modeling

    read = set()
    for mod in (norm, mlp, modeling):
        read |= set(re.findall(r"""get\(\s*["'](fuse_\w+)["']""", inspect.getsource(mod)))
    decided = {k for k in model_overrides("gpu", "float16") if k.startswith("fuse_")}
    assert read <= decided, read - decided


def test_paddle_version_line():
    import paddle

    assert paddle_problem(paddle) is None  # the Paddle the tests run on has every API used
    old_sdpa = types.SimpleNamespace(
        __version__="3.2.2", is_compiled_with_cuda=lambda: True, device=types.SimpleNamespace(),
        nn=types.SimpleNamespace(functional=types.SimpleNamespace(
            scaled_dot_product_attention=lambda query, key, value, attn_mask=None, dropout_p=0.0: None)))
    line = paddle_problem(old_sdpa)
    assert "\n" not in line and f">= {MIN_PADDLE}" in line and "3.2.2" in line
    assert "enable_gqa" in line and "paddlepaddle-gpu" in line


def test_engine_refuses_an_old_paddle_in_one_line(monkeypatch):
    from qwen_vl_psa import engine
    from qwen_vl_psa.errors import ModelLoadError

    monkeypatch.setattr(engine, "paddle_problem", lambda paddle: "Paddle 3.2.2 is too old: ...")
    with pytest.raises(ModelLoadError, match="too old"):
        engine.QwenVLInference("unused", verbose=False)


def test_warmup_compiles_with_the_model_shapes_on_a_gpu(monkeypatch):
    """On a GPU the warm-up runs every Triton entry point once with the model's heads, head size
    and dtype (stand-ins here record the calls); on a CPU it does nothing."""
    import paddle

    assert psa_mod.warmup(28, 4, 128, "bfloat16", AttentionConfig()) == 0.0  # CPU: nothing to compile
    seen = []

    def fake(name):
        def fn(q, k, *args, **kw):
            seen.append((name, tuple(q.shape), tuple(k.shape), str(q.dtype).split(".")[-1]))
            if name == "estimate":
                cfg, q_offset = args
                from psa_paddle.estimate import block_importance
                from psa_paddle.mask import compute_levels

                return compute_levels(block_importance(q, k, cfg, q_offset), k, cfg, q_offset), None
            return paddle.zeros(q.shape, q.dtype)
        return fn

    monkeypatch.setattr(psa_mod, "_import_triton", fake)
    monkeypatch.setattr(psa_mod, "_on_gpu", lambda place: True)
    monkeypatch.setattr(paddle.device, "get_device", lambda: "gpu:0")
    monkeypatch.setattr(paddle.device, "synchronize", lambda *a: None)
    t = psa_mod.warmup(4, 2, 16, "float32", AttentionConfig(query_block=64))
    assert t > 0
    names = {n for n, *_ in seen}
    assert names == {"estimate", "attention", "dense"}
    assert {(q[1], k[1], q[3], dt) for _, q, k, dt in seen} == {(4, 2, 16, "float32")}
    assert {k[2] for _, _, k, _ in seen} == {16 * 64, 16 * 64 - 3}  # aligned and unaligned lengths
    assert any(q[2] < k[2] for _, q, k, _ in seen)  # a prefill after cached tokens
