"""Steps 2-4: levels from importance, forced blocks, key-similarity cap.

Levels are handled as int32 inside (Paddle's CPU int8 kernels are few) and returned as int8.
"""
from __future__ import annotations

import math

import numpy as np
import paddle

from .config import AttentionConfig, ratio_intervals
from .pyramid import pad_to_block


def _intervals(cfg: AttentionConfig):
    return ratio_intervals(cfg.mask_ratios)


def _unsort(sorted_vals: paddle.Tensor, order: paddle.Tensor) -> paddle.Tensor:
    """Inverse of take_along_axis(x, order, -1): put sorted_vals back at the blocks' places."""
    return paddle.take_along_axis(sorted_vals, paddle.argsort(order, axis=-1), axis=-1)


def _causal_np(qb0: int, nQB: int, nKB: int) -> np.ndarray:
    """[nQB, nKB] bool: key block kb is visible from absolute query block qb0 + r."""
    return np.arange(nKB)[None, :] <= (qb0 + np.arange(nQB))[:, None]


def levels_from_importance(importance: paddle.Tensor, cfg: AttentionConfig, qb0: int) -> paddle.Tensor:
    """importance [B, H, nQB, nKB] float32 -> raw levels [B, H, nQB, nKB] int32 (not forced).

    A block whose energy (or rank) falls in no interval, e.g. past the last `hi`, gets 0.
    """
    if cfg.mask_mode == "energybound":
        return _energybound(importance.astype("float32"), cfg)
    return _topk(importance.astype("float32"), cfg, qb0)


def _energybound(imp, cfg):
    order = paddle.argsort(imp, axis=-1, descending=True, stable=True)
    cs = paddle.cumsum(paddle.take_along_axis(imp, order, axis=-1), axis=-1)
    total = cs[..., -1:]
    # Dividing by the cumsum's own last entry makes the final E exactly 1 (x/x), so float
    # rounding cannot push the tail outside the (.., 1] interval.
    ok = total > 0
    energy = paddle.where(ok, cs / paddle.where(ok, total, paddle.ones_like(total)), paddle.ones_like(cs))
    lv = paddle.zeros(imp.shape, "int32")
    for level, lower, hi in _intervals(cfg):
        hit = (energy > lower) & (energy <= hi)  # the crossing block has E > hi: next level
        lv = paddle.where(hit, paddle.full_like(lv, level), lv)
    return _unsort(lv, order)


def _topk(imp, cfg, qb0):
    B, H, nQB, nKB = imp.shape
    causal = paddle.to_tensor(_causal_np(qb0, nQB, nKB), place=imp.place)
    masked = paddle.where(causal, imp, paddle.full_like(imp, float("-inf")))
    order = paddle.argsort(masked, axis=-1, descending=True, stable=True)
    n = np.minimum(qb0 + np.arange(nQB) + 1, nKB).astype(np.float64)  # valid blocks per row
    rank = paddle.arange(nKB, dtype="int64").reshape([1, 1, 1, nKB])
    lv = paddle.zeros(imp.shape, "int32")
    for level, lower, hi in _intervals(cfg):
        # cut points in float64 on the host: floor(n*lo) must not wobble with device rounding
        a = paddle.to_tensor(np.floor(n * lower).astype(np.int64).reshape(1, 1, nQB, 1), place=imp.place)
        b = paddle.to_tensor(np.floor(n * hi).astype(np.int64).reshape(1, 1, nQB, 1), place=imp.place)
        lv = paddle.where((rank >= a) & (rank < b), paddle.full_like(lv, level), lv)
    return _unsort(lv, order)


def force_blocks(levels: paddle.Tensor, cfg: AttentionConfig, qb0: int) -> paddle.Tensor:
    """levels [B, H, nQB, nKB] int32 -> same with the prompt rows/columns, the diagonal and the
    sink column at 1, and everything right of the diagonal at 0."""
    nQB, nKB = levels.shape[-2:]
    qb = (qb0 + np.arange(nQB))[:, None]
    kb = np.arange(nKB)[None, :]
    n_text = math.ceil(cfg.text_length / cfg.query_block)
    ones = (qb >= nKB - n_text) | (kb >= nKB - n_text) | (kb == qb) | (kb == 0)
    ones = paddle.to_tensor(ones, place=levels.place)
    causal = paddle.to_tensor(_causal_np(qb0, nQB, nKB), place=levels.place)
    levels = paddle.where(ones, paddle.ones_like(levels), levels)
    return paddle.where(causal, levels, paddle.zeros_like(levels))


def _mean_cosine(kb: paddle.Tensor, g: int) -> paddle.Tensor:
    """kb [B, H, nKB, BLK, D] -> [B, H, nKB]: mean over groups of cos(first, last token)."""
    B, H, nKB, BLK, D = kb.shape
    x = kb.reshape([B, H, nKB, BLK // g, g, D])
    a, b = x[:, :, :, :, 0], x[:, :, :, :, g - 1]
    norm2 = (a * a).sum(-1) * (b * b).sum(-1)
    cos = (a * b).sum(-1) / paddle.sqrt(paddle.clip(norm2, min=1e-12))  # 0 for a zero key
    return cos.mean(-1)


def similarity_cap(k: paddle.Tensor, cfg: AttentionConfig) -> paddle.Tensor:
    """k [B, Hkv, Lk, D] -> cap [B, Hkv, nKB] int8 in {1, 2, 4, 8}.

    The last partial block is padded by repeating the last token, exactly as the pyramid is,
    so the cap describes the pooled keys the kernel would read. The choice cannot change a
    level: the last key block is causally visible only from its own (diagonal) query block,
    which is forced to 1, and min(1, cap) = 1.
    """
    B, H, Lk, D = k.shape
    BLK = cfg.query_block
    kb = pad_to_block(k.astype("float32"), BLK)
    kb = kb.reshape([B, H, kb.shape[2] // BLK, BLK, D])
    s2, s4, s8 = (_mean_cosine(kb, g) for g in (2, 4, 8))
    cap = paddle.full(s2.shape, 1, "int32")
    cap = paddle.where(s2 > cfg.sim_2x_threshold, paddle.full_like(cap, 2), cap)
    cap = paddle.where(s4 > cfg.sim_4x_threshold, paddle.full_like(cap, 4), cap)
    cap = paddle.where(s8 > cfg.sim_8x_threshold, paddle.full_like(cap, 8), cap)
    return cap.astype("int8")


def apply_cap(levels: paddle.Tensor, cap: paddle.Tensor) -> paddle.Tensor:
    """levels [B, Hq, nQB, nKB], cap [B, Hkv, nKB] -> min(level, cap); 0 stays 0 (cap >= 1)."""
    G = levels.shape[1] // cap.shape[1]
    cap_q = paddle.repeat_interleave(cap.astype("int32"), G, axis=1)  # tiny: [B, Hq, nKB]
    return paddle.minimum(levels.astype("int32"), cap_q.unsqueeze(2))


def compute_levels(importance, k, cfg: AttentionConfig, q_offset: int) -> paddle.Tensor:
    """Steps 2-4: importance [B, Hq, nQB, nKB] -> levels [B, Hq, nQB, nKB] int8."""
    qb0 = q_offset // cfg.query_block
    lv = force_blocks(levels_from_importance(importance, cfg, qb0), cfg, qb0)
    if cfg.use_sim_cap:
        lv = apply_cap(lv, similarity_cap(k, cfg))
    return lv.astype("int8")
