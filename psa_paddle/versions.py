"""The lowest Paddle this code needs, checked from what the installed Paddle offers.

What is used, and since when (read from Paddle's sources and release tags):

* ``paddle.nn.functional.scaled_dot_product_attention(..., scale=, enable_gqa=)``: PSA's dense
  GPU fallback and the router's offset-causal dense prefill. ``scale`` and ``enable_gqa`` came
  with Paddle PR #76446 (merged 2025-11), i.e. Paddle 3.3.0; 3.2.2 has neither.
* ``paddle.device.Event(enable_timing=True)`` and ``paddle.device.current_stream``: device-side
  stats and the Triton launch stream (Paddle 3.x's torch-like device API; present in 3.3.0).
* ``paddle.compat.use_torch_proxy_guard`` / ``paddle.enable_compat``: only with Triton < 3.8,
  whose CUDA driver needs ``torch.cuda`` while it is created (Paddle 3.3.0 has both; 3.2.2 has
  neither, and Triton < 3.8 then cannot create its driver: the one-warning fallback covers it).

:func:`paddle_problem` probes the features themselves (a development build reports version
0.0.0), and returns one line naming the version needed and how to upgrade, or None.
"""
from __future__ import annotations

import inspect

MIN_PADDLE = "3.3.0"
GPU_INSTALL = ("pip install 'paddlepaddle-gpu>=3.3.0' -i https://www.paddlepaddle.org.cn/packages/stable/cu126/ "
               "(see README.md, \"GPU install\")")
CPU_INSTALL = "pip install 'paddlepaddle>=3.3.0'"


def _missing_features(paddle) -> list:
    missing = []
    try:
        params = inspect.signature(paddle.nn.functional.scaled_dot_product_attention).parameters
    except (AttributeError, TypeError, ValueError):
        params = {}
    for name in ("scale", "enable_gqa"):
        if name not in params:
            missing.append(f"scaled_dot_product_attention({name}=)")
    device = getattr(paddle, "device", None)
    for name in ("Event", "current_stream"):
        if not hasattr(device, name):
            missing.append(f"paddle.device.{name}")
    return missing


def paddle_problem(paddle=None) -> str | None:
    """None when the installed Paddle has every API this code uses; else one line saying which
    version is needed and how to upgrade."""
    if paddle is None:
        import paddle
    missing = _missing_features(paddle)
    if not missing:
        return None
    try:
        gpu = bool(paddle.is_compiled_with_cuda())
    except Exception:  # noqa: BLE001
        gpu = False
    how = GPU_INSTALL if gpu else CPU_INSTALL
    return (f"Paddle {getattr(paddle, '__version__', '?')} is too old: this program needs Paddle >= {MIN_PADDLE} "
            f"(missing {', '.join(missing)}); upgrade with {how}")
