"""Finding, checking and loading a Qwen2.5-VL checkpoint: device, dtype, hub download, processor.

The command line imports this module for its constants before it knows the arguments are good,
so Paddle and paddleformers are imported inside the functions that need them."""
import json
import logging
import os
import re
import warnings
from typing import Callable, List

from .errors import InputError, ModelLoadError

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
HUBS = ("huggingface", "modelscope", "aistudio")
# What a model folder must hold to be loadable; the rest (tokenizer, processor) is checked on load.
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


def pick_device_and_dtype(requested: str, warn: Callable[[str], None]) -> (str, str):
    """GPU when Paddle has one, else CPU; bfloat16 falls back where the hardware lacks it."""
    import paddle

    if requested not in ("bfloat16", "float16", "float32"):
        raise InputError(f"--dtype must be bfloat16, float16 or float32, got {requested!r}")
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        paddle.set_device("gpu")
        if requested == "bfloat16" and not paddle.amp.is_bfloat16_supported():
            warn("this GPU has no bfloat16; using float16")
            return "gpu", "float16"
        return "gpu", requested
    paddle.set_device("cpu")
    if requested != "float32":
        warn(f"no GPU found: running on the CPU in float32 (not {requested}); this is slow for real models")
    return "cpu", "float32"


def resolve_model_dir(model: str, cache_dir: str, hub: str) -> str:
    """A local folder as is; a hub id is downloaded (or found) under cache_dir first."""
    if os.path.isdir(model):
        check_model_dir(model)
        return model
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"model {model!r} is neither a folder nor a hub id like Qwen/Qwen2.5-VL-3B-Instruct")
    if hub not in HUBS:
        raise InputError(f"--hub must be one of {', '.join(HUBS)}, got {hub!r}")
    try:
        if hub == "huggingface":
            from huggingface_hub import snapshot_download
            path = snapshot_download(model, cache_dir=cache_dir, allow_patterns=list(WEIGHT_PATTERNS))
        elif hub == "modelscope":
            from modelscope import snapshot_download
            path = snapshot_download(model, cache_dir=cache_dir, allow_patterns=list(WEIGHT_PATTERNS))
        else:  # aistudio's downloader takes a target folder, not a cache
            from aistudio_sdk.snapshot_download import snapshot_download
            path = snapshot_download(repo_id=model, local_dir=os.path.join(cache_dir, "aistudio", model),
                                     allow_patterns=list(WEIGHT_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: all the user's to fix
        raise ModelLoadError(hub_download_message(model, hub, e)) from e
    check_model_dir(path)
    return path


_OFFLINE = ("name or service not known", "temporary failure in name resolution", "failed to resolve",
            "nodename nor servname", "network is unreachable", "connection refused", "connecterror",
            "max retries exceeded", "offline", "timed out", "no route to host", "connection reset")


def hub_download_message(model: str, hub: str, exc: BaseException) -> str:
    """One line for a failed hub download: "no network" said plainly, otherwise the library's
    first sentence (its messages run over several lines and were cut mid-sentence)."""
    text = " ".join(str(exc).split())
    reason = re.search(r"\[Errno -?\d+\] [A-Z]?[a-z]+(?: [a-z]+)*", text)
    if any(k in text.lower() for k in _OFFLINE) or type(exc).__name__ in ("LocalEntryNotFoundError",
                                                                           "OfflineModeIsEnabled"):
        why = f" ({reason.group(0).strip().rstrip('.')})" if reason else ""
        return (f"cannot download {model!r} from {hub}: the hub cannot be reached{why} and the model is not in "
                f"the cache; check your network (or HTTPS_PROXY), or pass a downloaded folder with --model")
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0][:240]
    return (f"cannot download {model!r} from {hub}: {type(exc).__name__}: {first} (check the id, or pass a "
            f"local folder with --model)")


def check_model_dir(path: str):
    """The quick checks, before Paddle is imported: a config of the right architecture, weights."""
    from .checkpoint import check_architecture, read_config

    check_architecture(path, read_config(path))
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise ModelLoadError(f"model folder {path} has no *.safetensors weights: download the checkpoint "
                             "completely (or run python -m qwen_vl_psa.tiny_checkpoint DIR to try without one)")


def quiet_imports():
    """Before Paddle and paddleformers are imported: they read these at import time. setdefault,
    so a user's own setting wins. Called by the package's __init__."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found"
    os.environ.setdefault("GLOG_minloglevel", "2")
    # paddleformers warns at import that it hides PyTorch from transformers: true, and not the
    # user's concern. A filter survives the level its logger sets when it is created.
    logging.getLogger("PaddleFormers").addFilter(lambda r: "between PaddlePaddle and PyTorch" not in r.getMessage())


def quiet_libraries(verbose: bool):
    """paddleformers and the checkpoint loader log every step at INFO; users want the answer."""
    if not verbose:
        warnings.filterwarnings("ignore")
    import paddleformers  # noqa: F401  (importing it creates its loggers)

    ours = (__package__, "__main__")
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] not in ours:
            logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)


# paddleformers' fused kernels that the Qwen2.5-VL path can turn on, and the dtypes Paddle 3.3
# registers each one's GPU kernel for (none has a CPU kernel). fuse_rms_norm is on unless told
# otherwise (paddleformers/nn/norm.py); Paddle registers the GPU fused_rms_norm_ext for float32,
# float64 and bfloat16 only, so float16 must take the unfused RMSNorm. fuse_swiglu is off by
# default and stays off (its gain is small here; one less kernel to trust per dtype).
FUSED_OPS_GPU_DTYPES = {
    "fuse_rms_norm": ("float32", "float64", "bfloat16"),
    "fuse_swiglu": (),
}


def model_overrides(device: str, dtype: str) -> dict:
    """Config values for the model, its text and its vision config, on this device and dtype:
    each fused op only where its kernel exists; sdpa attention on a GPU, eager on a CPU."""
    out = {name: device == "gpu" and dtype in dtypes for name, dtypes in FUSED_OPS_GPU_DTYPES.items()}
    out["_attn_implementation"] = "sdpa" if device == "gpu" else "eager"
    return out


def configure_model(cfg, device: str, dtype: str):
    """Apply model_overrides to a Qwen2_5_VLConfig and both of its sub-configs; returns cfg."""
    for c in (cfg, cfg.text_config, cfg.vision_config):
        for name, value in model_overrides(device, dtype).items():
            setattr(c, name, value)
    return cfg


def load_model_and_processor(path: str, dtype: str, device: str):
    """Any checkpoint layout (see checkpoint.py), read-only: nothing is written to `path`.
    Returns (model, processor, what the checkpoint was: layout, tie, file dtypes, files)."""
    import paddle
    from paddleformers.transformers import AutoProcessor

    from .checkpoint import build_model, inspect_checkpoint, paddle_config

    ckpt = inspect_checkpoint(path)
    cfg = configure_model(paddle_config(ckpt), device, dtype)
    try:
        model = build_model(ckpt, cfg, dtype)
        # use_fast=False: the slow processor resizes with PIL bicubic, as the model was trained.
        processor = AutoProcessor.from_pretrained(path, use_fast=False)
    except ModelLoadError:
        raise
    except MemoryError:
        raise ModelLoadError(f"not enough memory to load the model in {path} ({ckpt.nbytes / 2**30:.1f} GiB of "
                             f"weights in the files, as {dtype} on the {device}): use a smaller model or a machine "
                             "with more memory") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"cannot load the model in {path}: {type(e).__name__}: {str(e)[:300]}") from e
    model.eval()
    paddle.set_grad_enabled(False)
    return model, processor, ckpt.describe()


def stop_token_ids(path: str, model, tokenizer) -> List[int]:
    """<|im_end|> and <|endoftext|> plus whatever generation_config.json / config.json name."""
    ids = set()
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(path, name)) as f:
                cfg = json.load(f)
            # transformers 5 keeps it only in the nested text_config
            eos = cfg.get("eos_token_id", (cfg.get("text_config") or {}).get("eos_token_id"))
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for tok in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid >= 0:
            ids.add(tid)
    return sorted(ids)


def peak_memory(device: str) -> dict:
    import paddle

    if device == "gpu":
        return {"peak_memory_mb": paddle.device.cuda.max_memory_allocated() / 2**20, "memory_kind": "gpu_allocator"}
    import resource
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "memory_kind": "process_rss"}
