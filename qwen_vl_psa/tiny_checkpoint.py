"""Write a randomly initialised, tiny Qwen2.5-VL in the official Hugging Face layout.

    python -m qwen_vl_psa.tiny_checkpoint DIR [--seed 0] [--layers 2] [--hidden 64]

DIR then holds what a downloaded Qwen/Qwen2.5-VL-*-Instruct folder holds: config.json in the
published format, sharded safetensors with an index (hub key names, torch orientation), a small
but real byte-level BPE tokenizer with Qwen's special tokens and chat template, and the
preprocessor config. Its answers are gibberish; every code path (vision encoder, mrope positions,
KV cache, PSA) runs exactly as with the real model, in well under a second on a CPU.
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


def write_tokenizer(tok, out_dir: str):
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    model = json.loads(tok.to_str())["model"]
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
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg)
    _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})


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


def write_shards(tensors: dict, out_dir: str, n_shards: int = 2):
    """model-0000k-of-0000n.safetensors plus model.safetensors.index.json, as the hub has them."""
    from safetensors.numpy import save_file

    names = sorted(tensors)
    groups = [names[i::n_shards] for i in range(n_shards)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, os.path.join(out_dir, fname), metadata={"format": "pt"})
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


def make_tiny_checkpoint(out_dir: str, seed: int = 0, layers: int = 2, hidden: int = 64,
                         vocab_size: int = 600) -> str:
    """Write the checkpoint into out_dir (created if needed) and return out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    write_tokenizer(tok, out_dir)
    cfg = hf_config(tok, layers, hidden)
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), preprocessor_config())
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": [cfg["eos_token_id"], cfg["bos_token_id"]],
        "pad_token_id": cfg["bos_token_id"],
        "do_sample": False,
    })
    write_shards(hf_weights(cfg, np.random.default_rng(seed)), out_dir)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="folder to write the checkpoint into")
    ap.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    ap.add_argument("--layers", type=int, default=2, help="language-model layers (default 2)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden size, a multiple of 32 (default 64)")
    args = ap.parse_args(argv)
    make_tiny_checkpoint(args.out_dir, args.seed, args.layers, args.hidden)
    print(f"wrote a tiny random Qwen2.5-VL to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
