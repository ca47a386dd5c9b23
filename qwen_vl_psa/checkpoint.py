"""Qwen2.5-VL checkpoints in every layout they come in, loaded without writing to their folder.

Layouts (python -m qwen_vl_psa.tiny_checkpoint writes each one, with the same weights):
  hub            the official Qwen/Qwen2.5-VL-*-Instruct repos: a flat config.json with
                 rope_scaling {"type": "mrope"}, tensors `model.*` / `visual.*` / `lm_head.*`
                 (3B: tied embeddings, no lm_head.weight)
  transformers4  saved by transformers 4.52 - 4.57 (most fine-tunes): the flat config plus a nested
                 text_config, tensors `model.language_model.*` / `model.visual.*` / `lm_head.*`
  transformers5  saved by transformers 5: only nested text_config / vision_config, rope_parameters,
                 tie_word_embeddings only at the top level, same tensor names as transformers4
Each in one model.safetensors or in shards with model.safetensors.index.json, with bfloat16,
float16 or float32 tensors.

paddleformers' own loader knows only the hub tensor names, reads tie_word_embeddings from the
nested text_config (default False), and writes `flex-ckpt.auto_generated.metadata` into the model
folder. So this module does the loading itself: the config is rewritten into the hub's flat form
(`hub_config`), the safetensors files are read through a read-only memory map, every tensor is
renamed to its hub name and converted exactly as paddleformers' conversion rules
(`Qwen2_5_VLPretrainedModel._gen_aoa_config`) do it: 2-D weights transposed to Paddle's [in, out],
q/k/v fused per key-value group, gate/up fused, lm_head from the embeddings when tied. The tests
check the result bit for bit against paddleformers' loader. Nothing is ever opened for writing.

Any problem (another architecture, a damaged or missing shard, weights that do not fit the
config) is a ModelLoadError with one line that says what was found and what to do.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from .errors import ModelLoadError

SUPPORTED = "Qwen2.5-VL (model_type qwen2_5_vl, Qwen2_5_VLForConditionalGeneration: Qwen/Qwen2.5-VL-*-Instruct " \
            "and its fine-tunes)"
# model_type -> what users call it, for the one-line "found X" message.
KNOWN_OTHERS = {
    "qwen2_vl": "Qwen2-VL",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL-MoE",
    "qwen2_5_omni": "Qwen2.5-Omni",
    "qwen2": "a text-only Qwen2 / Qwen2.5 model",
    "qwen3": "a text-only Qwen3 model",
    "qwen3_moe": "a text-only Qwen3-MoE model",
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors dtype -> numpy dtype the bytes are read as (bfloat16 as its raw 16 bits).
FILE_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Tensors some savers add that no model parameter uses.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    path: str
    layout: str  # hub / transformers4 / transformers5
    config: dict  # the hub's flat config.json form
    tied: bool  # lm_head is the embedding matrix
    files: Dict[str, SafetensorsFile]  # hub tensor name -> the file that holds it
    file_names: Dict[str, str]  # hub tensor name -> the name in the file
    file_dtypes: List[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(f.tensors[self.file_names[n]][3] - f.tensors[self.file_names[n]][2] for n, f in self.files.items())

    def describe(self) -> str:
        return (f"{self.layout} layout, {'tied' if self.tied else 'untied'} embeddings, "
                f"{'/'.join(self.file_dtypes)} tensors in {len(set(self.files.values()))} file(s)")


# ----------------------------------------------------------------------------- config


def read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"model folder {path} has no config.json: point --model at a Qwen2.5-VL checkpoint "
                             "folder in the Hugging Face layout") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}/config.json: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}/config.json is not a JSON object")
    return raw


def check_architecture(path: str, raw: dict):
    """One line for a checkpoint of another model family: what was found, what is supported."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    if model_type == "qwen2_5_vl" and all("Qwen2_5_VL" in a for a in archs):
        return
    found = KNOWN_OTHERS.get(model_type, f"model_type {model_type!r}")
    if model_type == "qwen2_5_vl":
        found = f"a Qwen2.5-VL config with architectures {archs}"
    elif model_type in KNOWN_OTHERS:
        found += f" (model_type {model_type!r}{', ' + archs[0] if archs else ''})"
    elif archs:
        found += f" ({archs[0]})"
    raise ModelLoadError(f"model folder {path} holds {found}; this tool runs {SUPPORTED} only")


def _layout_of_config(raw: dict) -> str:
    """The saving library's version when the config names it, else its shape."""
    major = str(raw.get("transformers_version") or "").split(".")[0]
    if "text_config" not in raw:
        return "hub"
    if major.isdigit():
        return "transformers5" if int(major) >= 5 else "transformers4"
    return "transformers5" if "hidden_size" not in raw else "transformers4"


def hub_config(raw: dict) -> dict:
    """Any layout's config.json as the official repos write it (flat text keys, rope_scaling mrope).

    The nested text_config (transformers >= 4.52) holds the numbers transformers itself uses, so
    it wins over the flat copies, except where it says null (4.52 - 4.57 write image_token_id:
    null there). tie_word_embeddings is where that version's transformers reads it: the
    text_config's for 4.x (whose top level may lack it or even say false for a tied model), the
    top level's for 5 (the only place 5 writes it). pad_token_id is dropped: Paddle's embedding
    returns zeros for that id where PyTorch returns its row, and the official configs carry none."""
    text = raw.get("text_config") or {}
    if not isinstance(text, dict):
        raise ModelLoadError("config.json has a text_config that is not an object")
    skip = {"text_config", "rope_parameters", "rope_scaling", "dtype", "torch_dtype", "pad_token_id",
            "tie_word_embeddings", "layer_types", "_name_or_path"}
    top_only = {"model_type", "architectures", "image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id", "vision_token_id"}
    cfg = {k: v for k, v in raw.items() if k not in skip}
    cfg.update({k: v for k, v in text.items() if k not in skip | top_only and v is not None})
    ties = (raw.get("tie_word_embeddings"), text.get("tie_word_embeddings"))
    for tie in (ties if _layout_of_config(raw) == "transformers5" else ties[::-1]):
        if tie is not None:
            cfg["tie_word_embeddings"] = bool(tie)
            break
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or raw.get("rope_parameters")
                or raw.get("rope_scaling") or {})
    if not rope.get("mrope_section"):
        raise ModelLoadError("config.json has no mrope_section (in rope_scaling or rope_parameters): "
                             "not a complete Qwen2.5-VL config")
    theta = rope.pop("rope_theta", None) or text.get("rope_theta") or raw.get("rope_theta")
    if theta is not None:
        cfg["rope_theta"] = theta
    kind = rope.pop("rope_type", None) or rope.get("type") or "default"
    rope["type"] = "mrope" if kind in ("default", "mrope") else kind
    cfg["rope_scaling"] = rope
    vision = dict(raw.get("vision_config") or {})
    for k in ("model_type", "dtype", "torch_dtype", "_name_or_path"):
        vision.pop(k, None)
    if "in_chans" not in vision and "in_channels" in vision:
        vision["in_chans"] = vision["in_channels"]
    cfg["vision_config"] = vision
    cfg["model_type"] = "qwen2_5_vl"
    return cfg


# ----------------------------------------------------------------------------- safetensors


class SafetensorsFile:
    """A safetensors file read through a read-only memory map; the header is checked up front."""

    def __init__(self, path: str):
        self.path = path
        name = os.path.basename(path)
        damaged = f"weights file {path} is damaged"
        fix = "download it again (or delete it and the checkpoint's other files and re-download)"
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 2 or n > min(size - 8, 100 * 2**20):
                    raise ModelLoadError(f"{damaged}: its header is missing or cut short ({size} bytes in the "
                                         f"file); {fix}")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise ModelLoadError(f"weights file {path} is missing: download the checkpoint completely") from None
        except OSError as e:
            raise ModelLoadError(f"cannot read weights file {path}: {e.strerror or e}") from e
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ModelLoadError(f"{damaged}: its header is not safetensors JSON; {fix}") from None
        if not isinstance(header, dict):
            raise ModelLoadError(f"{damaged}: its header is not safetensors JSON; {fix}")
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.tensors = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise ModelLoadError(f"{damaged}: tensor {key} has no valid dtype/shape/offsets; {fix}") from None
            if dtype not in FILE_DTYPES:
                raise ModelLoadError(f"tensor {key} in {name} is {dtype}: only BF16, F16 and F32 checkpoints are "
                                     "supported (a quantized checkpoint needs its own loader)")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(FILE_DTYPES[dtype]).itemsize
            if not (0 <= start <= end) or end - start != nbytes:
                raise ModelLoadError(f"{damaged}: tensor {key} does not match its size in the header; {fix}")
            if end > data_size:
                raise ModelLoadError(f"{damaged}: it is cut short ({size} bytes, the header needs "
                                     f"{self.data_start + end}); {fix}")
            self.tensors[key] = (dtype, shape, start, end)
        self._map = None

    def read(self, key: str) -> np.ndarray:
        """The tensor as stored (bfloat16 as uint16 bits), a view of the read-only map."""
        dtype, shape, start, end = self.tensors[key]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map[self.data_start + start:self.data_start + end].view(FILE_DTYPES[dtype]).reshape(shape)

    def close(self):
        self._map = None


def weight_files(path: str) -> Dict[str, SafetensorsFile]:
    """file tensor name -> its file: the index's weight map, else model.safetensors, else every
    *.safetensors in the folder."""
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"cannot read {index}: not a safetensors index with a weight_map "
                                 f"({type(e).__name__}); download the checkpoint again") from e
        shards = {}
        for fname in sorted(set(weight_map.values())):
            fpath = os.path.join(path, fname)
            if not os.path.isfile(fpath):
                raise ModelLoadError(f"{INDEX_NAME} in {path} names {fname}, which is missing: download the "
                                     "checkpoint completely")
            shards[fname] = SafetensorsFile(fpath)
        files = {}
        for key, fname in weight_map.items():
            if key not in shards[fname].tensors:
                raise ModelLoadError(f"{INDEX_NAME} in {path} says {fname} holds {key}, but it does not: the "
                                     "files are from different checkpoints; download it again")
            files[key] = shards[fname]
        return files
    names = [SINGLE_NAME] if os.path.isfile(os.path.join(path, SINGLE_NAME)) else \
        sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise ModelLoadError(f"model folder {path} has no *.safetensors weights: download the checkpoint "
                             "completely (or run python -m qwen_vl_psa.tiny_checkpoint DIR to try without one)")
    files = {}
    for fname in names:
        shard = SafetensorsFile(os.path.join(path, fname))
        for key in shard.tensors:
            files[key] = shard
    return files


def hub_name(name: str) -> str:
    """A tensor name of any layout as the official repos spell it."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def inspect_checkpoint(path: str) -> Checkpoint:
    """Read and check everything about a checkpoint folder except the tensor data."""
    raw = read_config(path)
    check_architecture(path, raw)
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelLoadError(f"model folder {path} holds a quantized Qwen2.5-VL ({method}): this tool loads "
                             "bfloat16 / float16 / float32 checkpoints only; use the unquantized model")
    cfg = hub_config(raw)
    by_file = weight_files(path)
    files, file_names = {}, {}
    for name, shard in by_file.items():
        hub = hub_name(name)
        if hub in files:
            raise ModelLoadError(f"the checkpoint in {path} holds tensor {hub} twice (as {file_names[hub]} and "
                                 f"{name}): its files are from different saves; download it again")
        files[hub], file_names[hub] = shard, name
    if not any(n.startswith("visual.") for n in files):
        raise ModelLoadError(f"the weights in {path} have no vision encoder (visual.* tensors): a text-only "
                             f"checkpoint; this tool runs {SUPPORTED} only")
    has_head = "lm_head.weight" in files
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = not has_head
    if not tied and not has_head:
        raise ModelLoadError(f"config.json in {path} says tie_word_embeddings is false, but the weights have no "
                             "lm_head.weight: the checkpoint is incomplete, or its config lost the tie setting")
    cfg["tie_word_embeddings"] = bool(tied)
    layout = _layout_of_config(raw)
    transformers_names = any(n.startswith(("model.language_model.", "model.visual.")) for n in by_file)
    if transformers_names != (layout != "hub"):  # a mix: loads all the same
        layout += f" config with {'transformers' if transformers_names else 'hub'} tensor names"
    dtypes = sorted({DTYPE_NAMES[s.tensors[file_names[n]][0]] for n, s in files.items()})
    return Checkpoint(path, layout, cfg, bool(tied), files, file_names, dtypes)


# ----------------------------------------------------------------------------- the model


def paddle_config(ckpt: Checkpoint):
    from paddleformers.transformers import Qwen2_5_VLConfig

    try:
        cfg = Qwen2_5_VLConfig.from_dict(dict(ckpt.config))
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"config.json in {ckpt.path} is not a valid Qwen2.5-VL config: {e}") from e
    cfg.tie_word_embeddings = ckpt.tied
    cfg.text_config.tie_word_embeddings = ckpt.tied
    return cfg


def _plan(pname: str, ndim: int, tied: bool) -> tuple:
    """(hub source names, how to combine them) for one Paddle parameter: paddleformers'
    `_gen_aoa_config` for Qwen2.5-VL, written out."""
    if pname == "lm_head.weight":
        return ["model.embed_tokens.weight" if tied else "lm_head.weight"], "copy"
    if pname.startswith("model.visual."):
        src = pname[len("model."):]
    elif pname.startswith("model.language_model."):
        src = "model." + pname[len("model.language_model."):]
    else:
        raise ModelLoadError(f"unexpected parameter {pname} in paddleformers' Qwen2.5-VL model: "
                             "this paddleformers version is not supported")
    if src.endswith(".self_attn.qkv_proj.weight") or src.endswith(".self_attn.qkv_proj.bias"):
        base, kind = src.rsplit(".qkv_proj.", 1)
        return [f"{base}.{x}_proj.{kind}" for x in "qkv"], "qkv_" + kind
    if src.endswith(".mlp.up_gate_proj.weight"):
        base = src[:-len(".up_gate_proj.weight")]
        return [f"{base}.gate_proj.weight", f"{base}.up_proj.weight"], "ffn"
    transpose = ndim == 2 and not src.endswith("embed_tokens.weight")
    return [src], "T" if transpose else "copy"


def _fuse_qkv(q, k, v, heads: int, kv_heads: int, axis: int) -> np.ndarray:
    """Per key-value group g: its query heads, then key head g, then value head g."""
    qs, ks, vs = np.split(q, heads, axis), np.split(k, kv_heads, axis), np.split(v, kv_heads, axis)
    per = heads // kv_heads
    parts = []
    for g in range(kv_heads):
        parts += qs[g * per:(g + 1) * per] + [ks[g], vs[g]]
    return np.concatenate(parts, axis)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounded to nearest even (as PyTorch and CUDA round; NaN kept)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _cast(x: np.ndarray, file_dtype: str, target: str) -> np.ndarray:
    """A file tensor as the numpy array Paddle takes for a `target` parameter (bfloat16: uint16)."""
    if file_dtype == "BF16":
        if target == "bfloat16":
            return x
        x = (x.astype(np.uint32) << 16).view(np.float32)
    if target == "bfloat16":
        return _to_bf16_bits(x.astype(np.float32))
    return x.astype(np.float32 if target == "float32" else np.float16)


def load_weights(model, ckpt: Checkpoint):
    """Every parameter of `model` from the checkpoint's files, converted one at a time."""
    import paddle

    text = model.config.text_config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    names = {paddle.bfloat16: "bfloat16", paddle.float16: "float16", paddle.float32: "float32"}
    used, missing = set(), []
    params = model.state_dict()
    for pname, param in params.items():
        sources, how = _plan(pname, len(param.shape), ckpt.tied)
        if any(s not in ckpt.files for s in sources):
            missing += [s for s in sources if s not in ckpt.files]
            continue
        target = names.get(param.dtype)
        if target is None:
            raise ModelLoadError(f"parameter {pname} is {param.dtype}: not a float type this loader converts to")
        arrays = []
        for s in sources:
            shard = ckpt.files[s]
            arrays.append(_cast(shard.read(ckpt.file_names[s]), shard.tensors[ckpt.file_names[s]][0], target))
            used.add(s)
        if how == "T":
            value = arrays[0].T
        elif how == "qkv_weight":
            value = _fuse_qkv(*(a.T for a in arrays), heads, kv_heads, axis=1)
        elif how == "qkv_bias":
            value = _fuse_qkv(*arrays, heads, kv_heads, axis=0)
        elif how == "ffn":
            value = np.concatenate([a.T for a in arrays], axis=1)
        else:
            value = arrays[0]
        if list(value.shape) != list(param.shape):
            raise ModelLoadError(f"tensor {ckpt.file_names[sources[0]]} in {ckpt.path} does not fit config.json "
                                 f"({'+'.join(sources)} give shape {list(value.shape)}, the config needs "
                                 f"{list(param.shape)}): the config is from another model size")
        param.set_value(np.ascontiguousarray(value))
    for shard in set(ckpt.files.values()):
        shard.close()
    if missing:
        raise ModelLoadError(f"the checkpoint in {ckpt.path} lacks {len(missing)} tensor(s) the model needs, "
                             f"e.g. {', '.join(missing[:3])}: it is incomplete or not a Qwen2.5-VL checkpoint")
    return sorted(n for n in ckpt.files if n not in used and not n.endswith(IGNORED_SUFFIXES)
                  and not (ckpt.tied and n == "lm_head.weight"))


def build_model(ckpt: Checkpoint, config, dtype: str):
    """The model in `dtype` with the checkpoint's weights, as from_pretrained builds it."""
    from paddleformers.transformers import Qwen2_5_VLForConditionalGeneration
    from paddleformers.transformers.model_utils import dtype_guard

    config.dtype = dtype
    for key in config.sub_configs:
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype
    with dtype_guard(dtype):
        model = Qwen2_5_VLForConditionalGeneration(config)
    load_weights(model, ckpt)
    return model

