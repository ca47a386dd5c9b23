"""Step 1: XAttention-style antidiagonal block importance, plain Paddle, chunked over queries."""
from __future__ import annotations

import math

import paddle
import paddle.nn.functional as F

from .config import AttentionConfig
from .pyramid import block_layout


def _zero_pad_rows(x: paddle.Tensor, front: int, back: int) -> paddle.Tensor:
    """[B, H, L, D] -> [B, H, front + L + back, D] with zero rows (missing positions)."""
    if front == 0 and back == 0:
        return x
    B, H, L, D = x.shape
    parts = [paddle.zeros([B, H, front, D], x.dtype)] if front else []
    parts.append(x)
    if back:
        parts.append(paddle.zeros([B, H, back, D], x.dtype))
    return paddle.concat(parts, axis=2)


def block_importance(q, k, cfg: AttentionConfig, q_offset: int | None = None) -> paddle.Tensor:
    """q [B, Hq, Lq, D], k [B, Hkv, Lk, D] -> importance [B, Hq, nQB, nKB] float32.

    Row r is absolute query block qb0 + r; each row sums to the number of strided query rows
    in the block (every strided row is one softmax). Blocks right of the diagonal are 0.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    q_offset = Lk - Lq if q_offset is None else q_offset
    BLK, S = cfg.query_block, cfg.xattn_stride
    T = BLK // S  # strided rows (and columns) per block
    nKB, qb0, nQB, front, back = block_layout(Lq, Lk, BLK, q_offset)

    # Keys as strided rows: ks[j] = concat_t k[j*S + t]; zero padding adds zero keys.
    ks = _zero_pad_rows(k.astype("float32"), 0, nKB * BLK - Lk).reshape([B, Hkv, nKB * T, S * D])
    # Queries at absolute positions, each stride group reversed so that one dot product
    # qs[i] . ks[j] = sum_t q[i*S + S-1-t] . k[j*S + t] is the tile's antidiagonal.
    qs = _zero_pad_rows(q.astype("float32"), front, back)
    qs = qs.reshape([B, Hkv, G, nQB * T, S, D]).flip(axis=4).reshape([B, Hkv, G, nQB * T, S * D])

    logit_scale = 1.0 / math.sqrt(D) / S
    chunk = max(1, cfg.xattn_chunk_size // BLK)  # query blocks per chunk
    rows = []
    for c0 in range(0, nQB, chunk):
        c1 = min(nQB, c0 + chunk)
        rows.append(_chunk_importance(qs, ks, qb0 + c0, qb0 + c1, qb0, T, nKB, logit_scale))
    return paddle.concat(rows, axis=3).reshape([B, Hq, nQB, nKB])


def _chunk_importance(qs, ks, a0, a1, qb0, T, nKB, logit_scale):
    """Absolute query blocks [a0, a1) -> [B, Hkv, G, a1-a0, nKB]; only keys up to block a1-1."""
    B, Hkv, G = qs.shape[:3]
    nb, R, C = a1 - a0, (a1 - a0) * T, a1 * T  # blocks, strided rows, strided key columns
    qc = qs[:, :, :, (a0 - qb0) * T : (a1 - qb0) * T].reshape([B, Hkv, G * R, -1])
    s = paddle.matmul(qc, ks[:, :, :C], transpose_y=True).reshape([B, Hkv, G, R, C])
    row = paddle.arange(a0 * T, a1 * T, dtype="int64").unsqueeze(1)  # absolute strided row
    col = paddle.arange(C, dtype="int64").unsqueeze(0)
    s = paddle.where(col <= row, s * logit_scale, paddle.full([], float("-inf"), "float32"))
    p = F.softmax(s, axis=-1)  # [B, Hkv, G, R, C]
    imp = p.reshape([B, Hkv, G, nb, T, a1, T]).sum(axis=[4, 6])  # [B, Hkv, G, nb, a1]
    if a1 < nKB:  # causal: nothing right of the chunk's last diagonal block
        imp = paddle.concat([imp, paddle.zeros([B, Hkv, G, nb, nKB - a1], "float32")], axis=4)
    return imp
