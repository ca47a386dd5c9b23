"""Memory-bounded attention for the vision encoder on the CPU.

paddleformers' Qwen2.5-VL vision attention calls the configured attention function once per
window (most layers) or once per whole image (the `fullatt_block_indexes` layers). The CPU runs
the "eager" function, which builds the full [heads, N, N] score matrix: for a 12-megapixel photo
(N = 65536 patches) that is tens of GB, so memory grew with the square of the pixels.

`chunked_attention` computes the same softmax(q k^T * scale) v a block of query rows at a time,
so at most about `MAX_SCORE_ELEMENTS` scores exist at once and memory grows linearly with the
pixels. Each row's softmax sees all keys, so the result equals eager attention (the tests check
1e-5); inputs small enough go to the eager function unchanged.

    install(model)   # the vision config's attention -> chunked (the engine does it on the CPU)

`causal_chunked(q, k, v, scaling)` does the same for the language model's dense causal prefill
on the CPU (psa_router sends it there): Paddle's CPU sdpa also builds the [heads, T, T] scores,
so a prompt of 15k image tokens took 12 GB and nine minutes with the tiny model.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS, AttentionInterface

CHUNKED = "qwen_vl_chunked_vision"
MAX_SCORE_ELEMENTS = 1 << 24  # 16M float32 scores (64 MB) per block of query rows


def chunked_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
                      is_causal=None, max_elements=None, **kw):
    """Non-causal, unmasked attention over [B, H, L, D] tensors, in blocks of query rows.

    Returns ([B, L, H*D], None) like paddleformers' attention functions. Anything else (a mask,
    causal attention, dropout in training) goes to the eager function as before."""
    eager = ALL_ATTENTION_FUNCTIONS["eager"]
    budget = max_elements or MAX_SCORE_ELEMENTS
    B, H, Lq, D = query.shape
    Lk = key.shape[2]
    special = (attention_mask is not None or is_causal or kw.get("attn_mask_startend_row_indices") is not None
               or kw.get("sink") is not None or (module.training and dropout))
    if special or B * H * Lq * Lk <= budget:
        return eager(module, query, key, value, attention_mask=attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kw)
    if getattr(module, "num_key_value_groups", 1) != 1:  # the vision encoder has no GQA
        return eager(module, query, key, value, attention_mask=attention_mask, dropout=dropout, scaling=scaling,
                     is_causal=is_causal, **kw)
    scaling = scaling if scaling is not None else D ** -0.5
    rows = max(1, budget // (B * H * Lk))
    key_t = key.transpose([0, 1, 3, 2])
    parts = []
    for start in range(0, Lq, rows):
        scores = paddle.matmul(query[:, :, start:start + rows], key_t) * scaling
        weights = F.softmax(scores, axis=-1, dtype=paddle.float32).astype(query.dtype)
        del scores
        parts.append(paddle.matmul(weights, value))
        del weights
    out = paddle.concat(parts, axis=2) if len(parts) > 1 else parts[0]
    out = out.transpose([0, 2, 1, 3]).reshape([B, Lq, H * D])
    return out, None


def causal_chunked(query, key, value, scaling, max_elements=None):
    """Causal attention of a prompt over itself ([B, H, L, D] in, [B, L, H*D] out) in blocks of
    query rows; key/value heads are repeated for grouped-query attention. Row i sees keys 0..i."""
    budget = max_elements or MAX_SCORE_ELEMENTS
    B, Hq, L, D = query.shape
    groups = Hq // key.shape[1]
    if groups > 1:
        key = paddle.repeat_interleave(key, groups, axis=1)
        value = paddle.repeat_interleave(value, groups, axis=1)
    rows = max(1, budget // (B * Hq * L))
    parts = []
    for start in range(0, L, rows):
        end = min(L, start + rows)
        scores = paddle.matmul(query[:, :, start:end], key[:, :, :end], transpose_y=True) * scaling
        future = paddle.arange(end).reshape([1, end]) > paddle.arange(start, end).reshape([end - start, 1])
        scores = paddle.where(future, paddle.full_like(scores, float("-inf")), scores)
        weights = F.softmax(scores, axis=-1, dtype=paddle.float32).astype(query.dtype)
        del scores
        parts.append(paddle.matmul(weights, value[:, :, :end]))
        del weights
    out = paddle.concat(parts, axis=2) if len(parts) > 1 else parts[0]
    return out.transpose([0, 2, 1, 3]).reshape([B, L, Hq * D])


def install(model) -> None:
    """Route the vision encoder's attention through `chunked_attention` (idempotent)."""
    AttentionInterface.register(CHUNKED, chunked_attention)
    visual = model.visual if hasattr(model, "visual") else model.model.visual
    configs = {id(block.attn.config): block.attn.config for block in visual.blocks}
    for cfg in configs.values():
        cfg._attn_implementation = CHUNKED
