"""Describe images and videos with Qwen2.5-VL on PaddlePaddle, optionally with PSA sparse prefill.

Command line:
    python infer_qwen2_5_vl_psa.py --type image --input photo.jpg --prompt "Describe this image"
    python infer_qwen2_5_vl_psa.py --type video --input clip.mp4 --fps 1 --use-psa

Notebook:
    from infer_qwen2_5_vl_psa import QwenVLInference
    m = QwenVLInference(model_name="Qwen/Qwen2.5-VL-3B-Instruct")
    m.inference_image("photo.jpg", "Describe this image")
    m.print_stats()

The application lives in the package `qwen_vl_psa` (the CLI in qwen_vl_psa/cli.py, the engine in
qwen_vl_psa/engine.py); this file keeps the entry point the project has always had.
"""
import sys

from qwen_vl_psa.cli import build_parser, main  # noqa: F401


def __getattr__(name):
    # QwenVLInference on first use: the command line's --help need not import Paddle.
    if name == "QwenVLInference":
        from qwen_vl_psa.engine import QwenVLInference
        return QwenVLInference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
