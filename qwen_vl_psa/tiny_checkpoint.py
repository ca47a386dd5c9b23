"""Write a randomly initialised, tiny Qwen2.5-VL in any of the layouts checkpoints come in.

    python -m qwen_vl_psa.tiny_checkpoint DIR [--seed 0] [--layers 2] [--hidden 64]
        [--layout hub|transformers4|transformers5] [--tie | --no-tie]
        [--dtype float32|bfloat16|float16] [--single-file]

With the defaults DIR holds what a downloaded Qwen/Qwen2.5-VL-*-Instruct folder holds: config.json
in the published format, sharded safetensors with an index (hub key names, torch orientation), a
small but real byte-level BPE tokenizer with Qwen's special tokens and chat template, and the
preprocessor config. Its answers are gibberish; every code path (vision encoder, mrope positions,
KV cache, PSA) runs exactly as with the real model, in well under a second on a CPU.

The same seed gives the same weights in every layout, so the layouts can be compared:
  hub            the official repos: flat config with rope_scaling mrope, tensors model.* / visual.*,
                 chat_template.json and preprocessor_config.json
  transformers4  saved by transformers 4.52 - 4.57 (most fine-tunes): the flat config plus nested
                 text_config, tensors model.language_model.* / model.visual.* / lm_head.*,
                 chat_template.jinja, preprocessor_config.json and video_preprocessor_config.json
  transformers5  saved by transformers 5: nested text_config / vision_config, rope_parameters,
                 tie_word_embeddings only at the top, processor_config.json, chat_template.jinja,
                 tokenizer.json without vocab.json / merges.txt
--tie drops lm_head.weight and ties the output layer to the embeddings (as Qwen2.5-VL-3B does);
--dtype is the tensors' type in the files; --single-file writes one model.safetensors, no index.
"""
import argparse
import json
import os
import sys

import numpy as np

# Qwen's special tokens, in the order the official tokenizer gives them ids (after the BPE vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The conversation format of Qwen2.5-VL-Instruct: a default system turn, one <|vision_start|>
# <|image_pad|>/<|video_pad|> <|vision_end|> group per media item (the processor expands the pad
# to the item's token count), and the assistant header when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tiny BPE: enough words that prompts tokenize into real merges.
CORPUS = """Describe this image. Describe this video in detail. What happens in the video?
Summarise the recording. When is the demo? Who is speaking? What colour is the car?
A photo of a cat sitting on a red sofa next to a window. The sky is blue and the grass is green.
A person walks across the street, then a bus arrives and the people get on board.
The chart shows the number of visitors per month; the highest value is in July.
You are a helpful assistant. The answer is yes. The answer is no. There are three dogs.
First, second, third, finally. Before and after. Left, right, top, bottom, center.
""" * 4


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained on CORPUS, plus Qwen's special tokens (ids after the vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def write_tokenizer(tok, out_dir: str, layout: str = "hub"):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
    if layout != "transformers5":  # transformers 5 saves tokenizer.json only
        with open(os.path.join(out_dir, "vocab.json"), "w") as f:
            json.dump(model["vocab"], f, ensure_ascii=False)
        with open(os.path.join(out_dir, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
            for merge in model["merges"]:
                f.write((merge if isinstance(merge, str) else " ".join(merge)) + "\n")
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    tok_cfg = {
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 131072,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "Qwen2Tokenizer",
    }
    if layout == "hub":
        tok_cfg["chat_template"] = CHAT_TEMPLATE
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg)
        _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
    else:  # transformers >= 4.52 keep the template in its own file only
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg)
        with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
            f.write(CHAT_TEMPLATE)


def hf_config(tok, layers: int, hidden: int) -> dict:
    """config.json in the published Qwen2.5-VL format, with tiny sizes and this tokenizer's ids."""
    heads, kv_heads = 4, 2
    head_dim = hidden // heads
    assert head_dim % 8 == 0, "hidden must be a multiple of 32 (mrope needs head_dim/2 split in three)"
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # like [16, 24, 24] for 128
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab = tok.get_vocab_size()
    vocab = (vocab + 63) // 64 * 64  # the official vocab is padded past the tokenizer too
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": hidden * 2,
        "max_position_embeddings": 128000,
        "max_window_layers": layers,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2,
            "hidden_act": "silu",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 4,
            "in_chans": 3,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "vocab_size": vocab,
    }


def hf_weights(cfg: dict, rng: np.random.Generator) -> dict:
    """Random float32 tensors under the hub's key names, in torch orientation ([out, in])."""
    H, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    vc = cfg["vision_config"]
    vh, vi, p, tp = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"], vc["temporal_patch_size"]
    merged = vh * vc["spatial_merge_size"] ** 2

    def w(*shape, scale=0.02):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n):
        return np.ones(n, dtype=np.float32)

    t = {"visual.patch_embed.proj.weight": w(vh, vc["in_chans"], tp, p, p)}
    for i in range(vc["depth"]):
        b = f"visual.blocks.{i}."
        t.update({
            b + "norm1.weight": ones(vh), b + "norm2.weight": ones(vh),
            b + "attn.qkv.weight": w(3 * vh, vh), b + "attn.qkv.bias": w(3 * vh),
            b + "attn.proj.weight": w(vh, vh), b + "attn.proj.bias": w(vh),
            b + "mlp.gate_proj.weight": w(vi, vh), b + "mlp.gate_proj.bias": w(vi),
            b + "mlp.up_proj.weight": w(vi, vh), b + "mlp.up_proj.bias": w(vi),
            b + "mlp.down_proj.weight": w(vh, vi), b + "mlp.down_proj.bias": w(vh),
        })
    t.update({
        "visual.merger.ln_q.weight": ones(vh),
        "visual.merger.mlp.0.weight": w(merged, merged), "visual.merger.mlp.0.bias": w(merged),
        "visual.merger.mlp.2.weight": w(vc["out_hidden_size"], merged), "visual.merger.mlp.2.bias": w(H),
        "model.embed_tokens.weight": w(V, H),
        "model.norm.weight": ones(H),
        # A larger output scale than the init default makes greedy answers vary with the input,
        # which the tests rely on to tell inputs apart.
        "lm_head.weight": w(V, H, scale=0.5),
    })
    for i in range(L):
        b = f"model.layers.{i}."
        t.update({
            b + "input_layernorm.weight": ones(H), b + "post_attention_layernorm.weight": ones(H),
            b + "self_attn.q_proj.weight": w(H, H, scale=0.2), b + "self_attn.q_proj.bias": w(H),
            b + "self_attn.k_proj.weight": w(kv, H, scale=0.2), b + "self_attn.k_proj.bias": w(kv),
            b + "self_attn.v_proj.weight": w(kv, H), b + "self_attn.v_proj.bias": w(kv),
            b + "self_attn.o_proj.weight": w(H, H),
            b + "mlp.gate_proj.weight": w(I, H), b + "mlp.up_proj.weight": w(I, H),
            b + "mlp.down_proj.weight": w(H, I),
        })
    return t


LAYOUTS = ("hub", "transformers4", "transformers5")
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Text keys the flat (official) config carries at the top and transformers' text_config holds.
TEXT_KEYS = ("attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size", "initializer_range",
             "intermediate_size", "max_position_embeddings", "max_window_layers", "num_attention_heads",
             "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_theta", "sliding_window", "use_cache",
             "use_sliding_window", "vocab_size")


def layout_config(cfg: dict, layout: str, tie: bool, dtype: str) -> dict:
    """The official flat config rewritten as the given layout's library would save it."""
    cfg = json.loads(json.dumps(cfg))
    cfg["tie_word_embeddings"] = tie
    cfg["torch_dtype"] = dtype
    if layout == "hub":
        return cfg
    mrope = cfg["rope_scaling"]["mrope_section"]
    if layout == "transformers4":
        # 4.52 - 4.57 keep the flat keys and add a text_config copy, as a 4.52.4 save of a 3B
        # fine-tune has it: the text config rewrites the rope type "mrope" to "default" in the dict
        # both share, holds tie_word_embeddings (the top level has none), the media token ids as
        # null, and often the trainer's pad_token_id.
        rope = {"mrope_section": mrope, "rope_type": "default", "type": "default"}
        text = {k: cfg[k] for k in TEXT_KEYS}
        text.update({"model_type": "qwen2_5_vl_text", "rope_scaling": rope, "tie_word_embeddings": tie,
                     "torch_dtype": dtype, "layer_types": ["full_attention"] * cfg["num_hidden_layers"],
                     "architectures": cfg["architectures"], "vision_token_id": cfg["vision_token_id"],
                     "image_token_id": None, "video_token_id": None, "pad_token_id": cfg["bos_token_id"]})
        cfg.update({"rope_scaling": dict(rope), "text_config": text, "transformers_version": "4.52.4"})
        del cfg["tie_word_embeddings"]
        cfg["vision_config"] = {**cfg["vision_config"], "model_type": "qwen2_5_vl", "torch_dtype": dtype,
                                "initializer_range": 0.02}
        return cfg
    # transformers 5 (as 5.3 writes it): only the nested configs hold the sizes, the rope
    # parameters (with rope_theta) replace rope_scaling, "dtype" replaces "torch_dtype", and
    # tie_word_embeddings is a top-level key only.
    text = {k: cfg[k] for k in TEXT_KEYS if k != "rope_theta"}
    text.update({"model_type": "qwen2_5_vl_text", "dtype": dtype, "pad_token_id": None, "sliding_window": None,
                 "layer_types": ["full_attention"] * cfg["num_hidden_layers"],
                 "rope_parameters": {"mrope_section": mrope, "rope_theta": cfg["rope_theta"], "rope_type": "default",
                                     "type": "mrope"}})
    vision = {**cfg["vision_config"], "in_channels": cfg["vision_config"]["in_chans"], "model_type": "qwen2_5_vl",
              "initializer_range": 0.02}
    top = {k: cfg[k] for k in ("architectures", "image_token_id", "model_type", "video_token_id",
                                "vision_end_token_id", "vision_start_token_id", "vision_token_id")}
    top.update({"dtype": dtype, "text_config": text, "tie_word_embeddings": tie, "transformers_version": "5.3.0",
                "vision_config": vision})
    return top


def layout_names(tensors: dict, layout: str, tie: bool) -> dict:
    """Hub tensor names as the layout spells them; tied checkpoints carry no lm_head.weight."""
    out = {}
    for name, value in tensors.items():
        if tie and name == "lm_head.weight":
            continue
        if layout != "hub" and name.startswith("model."):
            name = "model.language_model." + name[len("model."):]
        elif layout != "hub" and name.startswith("visual."):
            name = "model." + name
        out[name] = value
    return out


def to_file_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the file's type; bfloat16 as its raw uint16 bits, rounded to nearest even."""
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def save_safetensors(tensors: dict, path: str, dtype: str = "float32"):
    """The safetensors format by hand, so bfloat16 (which numpy lacks) can be written too."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name]).tobytes()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in blobs:
            f.write(data)


def write_shards(tensors: dict, out_dir: str, n_shards: int = 2, dtype: str = "float32"):
    """model-0000k-of-0000n.safetensors plus model.safetensors.index.json, as the hub has them
    (n_shards=1: one model.safetensors and no index, as a small save_pretrained writes it)."""
    tensors = {n: to_file_dtype(t, dtype) for n, t in tensors.items()}
    if n_shards == 1:
        save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"), dtype)
        return
    names = sorted(tensors)
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        save_safetensors({n: tensors[n] for n in group}, os.path.join(out_dir, fname), dtype)
        for n in group:
            weight_map[n] = fname
            total += tensors[n].nbytes
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def preprocessor_config() -> dict:
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def _write_json(path: str, obj: dict):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_processor(out_dir: str, layout: str):
    pre = preprocessor_config()
    if layout == "hub":
        _write_json(os.path.join(out_dir, "preprocessor_config.json"), pre)
        return
    video = {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
    if layout == "transformers4":
        _write_json(os.path.join(out_dir, "preprocessor_config.json"), pre)
        video["processor_class"] = pre["processor_class"]
        _write_json(os.path.join(out_dir, "video_preprocessor_config.json"), video)
        return
    image = {k: v for k, v in pre.items() if k != "processor_class"}
    _write_json(os.path.join(out_dir, "processor_config.json"),
                {"image_processor": image, "video_processor": video, "processor_class": pre["processor_class"]})


def make_tiny_checkpoint(out_dir: str, seed: int = 0, layers: int = 2, hidden: int = 64,
                         vocab_size: int = 600, layout: str = "hub", tie: bool = False,
                         dtype: str = "float32", single_file: bool = False) -> str:
    """Write the checkpoint into out_dir (created if needed) and return out_dir."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    write_tokenizer(tok, out_dir, layout)
    cfg = hf_config(tok, layers, hidden)
    weights = hf_weights(cfg, np.random.default_rng(seed))
    _write_json(os.path.join(out_dir, "config.json"), layout_config(cfg, layout, tie, dtype))
    write_processor(out_dir, layout)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]],
        "pad_token_id": cfg["bos_token_id"],
        "do_sample": False,
    })
    write_shards(layout_names(weights, layout, tie), out_dir, 1 if single_file else 2, dtype)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder to write the checkpoint into")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    ap.add_argument("--layers", type=int, default=2, help="language-model layers (default 2)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size, a multiple of 32 (default 64)")
    ap.add_argument("--layout", choices=LAYOUTS, default="hub",
                    help="which library's file layout to write (default hub: the official repos)")
    ap.add_argument("--tie", action=argparse.BooleanOptionalAction, default=False,
                    help="tie the output layer to the embeddings, with no lm_head.weight (default: untied)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="tensor type in the files")
    ap.add_argument("--single-file", action="store_true", help="one model.safetensors instead of shards + index")
    args = ap.parse_args(argv)
    make_tiny_checkpoint(args.out_dir, args.seed, args.layers, args.hidden, layout=args.layout, tie=args.tie,
                         dtype=args.dtype, single_file=args.single_file)
    print(f"wrote a tiny random Qwen2.5-VL ({args.layout} layout, {'tied' if args.tie else 'untied'}, "
          f"{args.dtype}) to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
