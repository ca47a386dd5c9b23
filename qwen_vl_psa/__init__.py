"""Qwen2.5-VL on PaddlePaddle with Pyramid Sparse Attention prefill: the application package.

    from qwen_vl_psa import QwenVLInference      # the engine (loads Paddle and paddleformers)
    python -m qwen_vl_psa --help                  # the command line (also `qwen-vl-psa`)

Importing the package itself is light: the engine and its model stack load on first use of
`QwenVLInference` / `MediaSession`, so the command line answers --help and bad arguments fast.
"""
from .errors import InputError, MediaError, MediaNotFoundError, ModelLoadError, QwenVLError, SessionClosedError  # noqa: F401
from .loading import quiet_imports

__version__ = "0.2.0"

quiet_imports()


def __getattr__(name):
    if name == "QwenVLInference":
        from .engine import QwenVLInference
        return QwenVLInference
    if name == "MediaSession":
        from .session import MediaSession
        return MediaSession
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
