"""The Triton path fails over cleanly: one warning naming the cause, the right answer, Triton off.

In-process tests: stand-ins for the Triton functions raise each kind of failure the Triton path
is known to produce (as read from Triton 3.5-3.9's sources), on a "GPU" (psa._on_gpu patched;
the tensors are CPU tensors, so the GPU fallback, Paddle's scaled_dot_product_attention, runs on
the CPU). Subprocess tests: the real Triton on this GPU-less machine (driver creation fails for
real), and Paddle's torch proxy not left in sys.modules by driver creation.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import paddle
import pytest

import psa_paddle.psa as psa_mod
from psa_paddle import AttentionConfig, PSAStats, TritonBackendError, psa_attention
from psa_paddle.attention import dense_causal_attention

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(query_block=64, text_length=0, min_seq_len=0)


def _compile_error():
    from triton.compiler.errors import CompilationError

    return CompilationError("def _attn_kernel(...)", None, "PassManager::run failed")


def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(163840, 101376, "shared memory")


def _unsupported_gpu():
    from psa_paddle.tiles import select

    try:
        select(75, 64 * 1024, "bfloat16")
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("select should refuse bfloat16 on 7.5")


# kind -> (error factory, words the one warning must contain: the cause and what to do)
FAILURES = {
    "triton missing": (lambda: ImportError("No module named 'triton'"), ["not importable", "pip install"]),
    "no driver": (lambda: RuntimeError("0 active drivers ([]). There should only be one."),
                  ["no usable CUDA driver", "nvidia-smi"]),
    "libcuda missing": (lambda: RuntimeError("libcuda.so cannot found!\nPossible files are located at []."),
                        ["no usable CUDA driver", "TRITON_LIBCUDA_PATH"]),
    "no C compiler": (lambda: RuntimeError("Failed to find C compiler. Please specify via CC environment variable "
                                           "or set triton.knobs.build.impl."), ["C compiler", "gcc"]),
    "compile error": (_compile_error, ["could not compile", "pip install"]),
    "out of shared memory": (_out_of_resources, ["more GPU resources", "report"]),
    "launch failure": (lambda: RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"),
                       ["Triton path failed", "report"]),
    "bf16 on a 7.5 GPU": (_unsupported_gpu, ["bfloat16", "float16"]),
}


@pytest.fixture(autouse=True)
def _fresh_triton_state():
    psa_mod.reset_triton_state()
    yield
    psa_mod.reset_triton_state()


def _qkv(seed=0, L=256):
    rng = np.random.default_rng(seed)
    shapes = ((1, 4, L, 64), (1, 2, L, 64), (1, 2, L, 64))
    return [paddle.to_tensor(rng.standard_normal(s).astype("float32")) for s in shapes]


def _psa_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("PSA:")]


@pytest.mark.parametrize("kind", list(FAILURES))
def test_each_failure_warns_once_answers_and_turns_triton_off(monkeypatch, kind):
    make_error, words = FAILURES[kind]
    tried = []

    def failing(name):
        def fn(*args, **kwargs):
            tried.append(name)
            raise make_error()
        return fn

    monkeypatch.setattr(psa_mod, "_import_triton", failing)
    monkeypatch.setattr(psa_mod, "_on_gpu", lambda place: True)  # as on a GPU
    q, k, v = _qkv()
    ref = dense_causal_attention(q, k, v, 0, 0.125).numpy()
    stats = PSAStats()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out1 = psa_attention(q, k, v, AttentionConfig(**SMALL), scale=0.125, stats=stats)
        out2 = psa_attention(q, k, v, AttentionConfig(**SMALL), scale=0.125, stats=stats)
    msgs = _psa_warnings(record)
    assert len(msgs) == 1, msgs
    assert "Triton is off for this process" in msgs[0] and "dense attention" in msgs[0]
    for w in words:
        assert w in msgs[0], (w, msgs[0])
    assert "\n" not in msgs[0]
    assert tried == ["estimate"]  # tried once, never again in this process
    np.testing.assert_allclose(out1.numpy(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out2.numpy(), ref, rtol=1e-4, atol=1e-5)
    assert [c.backend for c in stats.calls] == ["dense", "dense"]
    assert psa_mod.triton_off_reason() is not None
    # a forced Triton backend raises (a ValueError subclass) with the cause instead
    with pytest.raises(TritonBackendError, match="cannot run") as exc:
        psa_attention(q, k, v, AttentionConfig(backend="triton", **SMALL))
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("kind", ["no driver", "out of shared memory"])
def test_forced_triton_raises_instead_of_falling_back(monkeypatch, kind):
    make_error, words = FAILURES[kind]

    def failing(name):
        def fn(*args, **kwargs):
            raise make_error()
        return fn

    monkeypatch.setattr(psa_mod, "_import_triton", failing)
    monkeypatch.setattr(psa_mod, "_on_gpu", lambda place: True)
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(TritonBackendError, match=words[0]):
            psa_attention(q, k, v, AttentionConfig(backend="triton", **SMALL))
    assert _psa_warnings(record) == []
    assert psa_mod.triton_off_reason() is None  # a forced run does not decide for auto


def test_dense_fallback_below_min_seq_len_too(monkeypatch):
    """The dense Triton kernel (short prompts) fails over the same way."""
    def failing(name):
        def fn(*args, **kwargs):
            raise RuntimeError("0 active drivers ([]). There should only be one.")
        return fn

    monkeypatch.setattr(psa_mod, "_import_triton", failing)
    monkeypatch.setattr(psa_mod, "_on_gpu", lambda place: True)
    q, k, v = _qkv(1, L=200)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = psa_attention(q[:, :, 50:], k, v, AttentionConfig(query_block=64, min_seq_len=4096))
    assert len(_psa_warnings(record)) == 1
    np.testing.assert_allclose(out.numpy(), dense_causal_attention(q[:, :, 50:], k, v, 50, 0.125).numpy(),
                               rtol=1e-4, atol=1e-5)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "TRITON_INTERPRET": "0"})


@pytest.mark.slow
def test_real_triton_without_a_gpu_driver_warns_once_and_answers():
    """The real Triton on this GPU-less machine, as on a box where Triton cannot run: the first
    launch creates the driver, which fails; one warning, the dense answer, no torch left over."""
    pytest.importorskip("triton")
    r = _run("""
        import sys, warnings
        import numpy as np, paddle
        import psa_paddle.psa as psa
        from psa_paddle import AttentionConfig, psa_attention
        from psa_paddle.attention import dense_causal_attention
        psa._on_gpu = lambda place: True  # the CPU tensors stand in for GPU ones
        rng = np.random.default_rng(0)
        q, k, v = (paddle.to_tensor(rng.standard_normal(s).astype('float32'))
                   for s in ((1, 4, 256, 64), (1, 2, 256, 64), (1, 2, 256, 64)))
        cfg = AttentionConfig(query_block=64, text_length=0, min_seq_len=0)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter('always')
            out = psa_attention(q, k, v, cfg)
            out = psa_attention(q, k, v, cfg)
        msgs = [str(w.message) for w in rec if str(w.message).startswith('PSA:')]
        assert len(msgs) == 1, msgs
        print(msgs[0])
        ref = dense_causal_attention(q, k, v, 0, 0.125).numpy()
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)
        assert 'torch' not in sys.modules, sys.modules.get('torch')
        print('OK')
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    assert "no usable CUDA driver" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("triton_path", ["torch-free (Triton >= 3.8)", "via Paddle's proxy (Triton < 3.8)"])
def test_driver_creation_leaves_no_torch_module(triton_path):
    """Forcing Triton's driver creation the product's way leaves no `torch` in sys.modules.

    Without a GPU the creation ends in Triton's "0 active drivers" error, but only after
    Triton's backend checks ran their `import torch` (the AMD check always does; under Paddle's
    proxy, the NVIDIA one too) - which is what used to leave Paddle's proxy behind as `torch`.
    """
    pytest.importorskip("triton")
    force_old = "launch._torch_free_cuda_driver = lambda nv: False" if "proxy" in triton_path else ""
    r = _run(f"""
        import sys
        import paddle
        from psa_paddle import launch
        {force_old}
        import psa_paddle.triton_attention  # the kernels' module import, as in a prefill
        try:
            launch.ensure_driver()
        except RuntimeError as e:
            print('driver:', e)
        leftover = sorted(n for n in sys.modules if n == 'torch' or n.startswith('torch.'))
        assert not leftover, leftover
        import importlib.util
        assert importlib.util.find_spec('torch') is None or 'paddle' not in str(importlib.util.find_spec('torch'))
        print('OK')
    """)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


@pytest.mark.slow
def test_plain_enable_compat_would_leave_the_proxy():
    """The finding this guards against, shown on this machine: Paddle's process-wide compat
    followed by driver creation leaves the proxy registered as `torch`."""
    pytest.importorskip("triton")
    r = _run("""
        import sys
        import paddle
        paddle.enable_compat(scope={'triton'}, silent=True)
        from triton.runtime import driver
        try:
            driver.active
        except RuntimeError:
            pass
        print('torch' in sys.modules and 'paddle' in repr(sys.modules['torch']))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "True", r.stdout + r.stderr


def test_use_psa_where_triton_cannot_run_warns_once_and_answers(model, monkeypatch):
    """As a new user on a GPU box where Triton cannot run: PSA on, the real Triton fails at its
    first launch (this machine has no CUDA driver), one warning, and the answer is the dense one.
    The CPU tensors stand in for GPU ones (psa._on_gpu patched)."""
    pytest.importorskip("triton")
    frames = (np.random.default_rng(3).random((8, 112, 140, 3)) * 255).astype(np.uint8)
    from qwen_vl_psa.prompt import MediaInput

    def ask():
        media = MediaInput([{"type": "video"}], {"videos": [frames], "fps": 2.0}, kind="video")
        return model.ask(media, "What happens?", max_tokens=6)

    dense = ask()
    dense_ids = list(model.last_token_ids)
    monkeypatch.setattr(psa_mod, "_on_gpu", lambda place: True)
    model.enable_psa(AttentionConfig(query_block=64, min_seq_len=0, text_length=64))
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            answer = ask()
        msgs = _psa_warnings(record)
        assert len(msgs) == 1 and "no usable CUDA driver" in msgs[0], msgs
        assert answer == dense and model.last_token_ids == dense_ids
        s = model.stats["psa"]
        assert "no usable CUDA driver" in s["triton_off"]
    finally:
        model.disable_psa()
