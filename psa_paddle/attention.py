"""Step 5 in plain Paddle (any device): one softmax over the pyramid levels of each block.

Also the dense causal attention used below cfg.min_seq_len. Both compute in float32 and
never hold more than one query block (pyramid) or a bounded row chunk (dense) of logits.
"""
from __future__ import annotations

import math

import numpy as np
import paddle

from .config import block_from_levels_shape
from .pyramid import PYRAMID_LEVELS, block_layout, build_pyramid


def infer_block(Lk: int, q_offset: int, n_rows: int, n_cols: int) -> int:
    """The block size a levels tensor [.., n_rows, n_cols] was built with (config's one rule)."""
    return block_from_levels_shape(Lk, q_offset, n_rows, n_cols)


def _pad_query(q, front, back):
    B, H, L, D = q.shape
    parts = [paddle.zeros([B, H, front, D], q.dtype)] if front else []
    parts.append(q)
    if back:
        parts.append(paddle.zeros([B, H, back, D], q.dtype))
    return paddle.concat(parts, axis=2) if len(parts) > 1 else q


def pyramid_attention_paddle(q, k, v, levels, q_offset: int, scale: float, *, block: int | None = None):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], levels [B, Hq, nQB, nKB] int -> [B, Hq, Lq, D].

    Level r of block kb means its keys/values mean-pooled over r tokens; pooled key j of the
    block stands for r tokens, hence the logit bonus ln(r), and is visible to absolute query
    position p only if its whole group is in the past: kb*BLK + (j+1)*r - 1 <= p.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Lq == 0:
        return paddle.zeros([B, Hq, 0, D], q.dtype)
    G = Hq // Hkv
    nQB, nKB = levels.shape[-2:]
    BLK = block or infer_block(Lk, q_offset, nQB, nKB)
    _, qb0, _, front, back = block_layout(Lq, Lk, BLK, q_offset)

    ks = build_pyramid(k.astype("float32"), BLK)
    vs = build_pyramid(v.astype("float32"), BLK)
    # [B*Hkv*nKB, BLK/r, D]: one row per (batch, kv head, block), ready for a 1-D gather
    ks = [x.reshape([B * Hkv * nKB, BLK // r, D]) for x, r in zip(ks, PYRAMID_LEVELS)]
    vs = [x.reshape([B * Hkv * nKB, BLK // r, D]) for x, r in zip(vs, PYRAMID_LEVELS)]
    # base row of (b, kv head of h): GQA reads the shared kv head, never a repeated copy
    base = (np.arange(B)[:, None] * Hkv + np.arange(Hq)[None, :] // G) * nKB
    base = paddle.to_tensor(base.astype(np.int64), place=q.place).unsqueeze(-1)  # [B, Hq, 1]
    # last absolute offset (within its block) each pooled key covers, per level
    last = {r: paddle.to_tensor(((np.arange(BLK // r) + 1) * r - 1).astype(np.int64), place=q.place)
            for r in PYRAMID_LEVELS}

    lv = levels.astype("int32")
    # max blocks per level over (batch, head), per row: sizes the gathers without a sync per row
    counts = {r: (lv == r).astype("int32").sum(axis=-1).max(axis=[0, 1]).numpy() for r in PYRAMID_LEVELS}
    qp = _pad_query(q.astype("float32"), front, back)  # [B, Hq, nQB*BLK, D]
    outs = []
    for row in range(nQB):
        m = qb0 + row
        qblk = qp[:, :, row * BLK : (row + 1) * BLK]
        qpos = paddle.arange(m * BLK, (m + 1) * BLK, dtype="int64").reshape([1, 1, BLK, 1])
        lrow = lv[:, :, row, : m + 1]  # [B, Hq, m+1], causal blocks only
        logits, values = [], []
        for i, r in enumerate(PYRAMID_LEVELS):
            n = int(counts[r][row])
            if n == 0:
                continue
            s, vv = _level_logits(qblk, qpos, lrow, r, n, ks[i], vs[i], base, last[r], BLK, scale)
            logits.append(s)
            values.append(vv)
        outs.append(_softmax_av(logits, values, qblk.shape))
    out = paddle.concat(outs, axis=2)[:, :, front : front + Lq]
    return out.astype(q.dtype)


def _level_logits(qblk, qpos, lrow, r, n, kflat, vflat, base, last, BLK, scale):
    """Gather the n (max over heads) level-r blocks of one query-block row.

    -> logits [B, Hq, BLK, n*BLK/r] (masked with -inf), values [B, Hq, n*BLK/r, D]
    """
    B, Hq, _, D = qblk.shape
    nb = lrow.shape[-1]
    kb = paddle.arange(nb, dtype="int64").reshape([1, 1, nb])
    sel = lrow == r
    # selected blocks first (in block order); unselected ones fill the tail and are masked
    order = paddle.argsort(paddle.where(sel, kb, kb + nb), axis=-1)[:, :, :n]  # [B, Hq, n]
    valid = paddle.arange(n, dtype="int64") < sel.astype("int64").sum(-1, keepdim=True)  # [B, Hq, n]
    idx = (base + order).reshape([-1])
    kk = paddle.gather(kflat, idx, axis=0).reshape([B, Hq, n * (BLK // r), D])
    vv = paddle.gather(vflat, idx, axis=0).reshape([B, Hq, n * (BLK // r), D])
    s = paddle.matmul(qblk, kk, transpose_y=True) * scale + math.log(r)
    kpos = (order.unsqueeze(-1) * BLK + last).reshape([B, Hq, 1, n * (BLK // r)])
    ok = valid.unsqueeze(-1).expand([B, Hq, n, BLK // r]).reshape([B, Hq, 1, n * (BLK // r)])
    vis = (kpos <= qpos) & ok
    return paddle.where(vis, s, paddle.full([], float("-inf"), "float32")), vv


def _softmax_av(logits, values, qshape):
    """One softmax over the concatenated levels -> [B, Hq, BLK, D]; rows seeing nothing -> 0."""
    if not logits:
        return paddle.zeros(qshape, "float32")
    s = paddle.concat(logits, axis=-1)
    vv = paddle.concat(values, axis=2)
    mx = s.max(axis=-1, keepdim=True)
    mx = paddle.where(paddle.isinf(mx), paddle.zeros_like(mx), mx)
    # Masked keys are zeroed explicitly: Paddle's CPU exp(-inf) is 2.9e-39, not 0, which turns a
    # row that sees no key into a uniform average instead of zeros.
    p = paddle.where(paddle.isinf(s), paddle.zeros_like(s), paddle.exp(s - mx))
    den = p.sum(axis=-1, keepdim=True)
    return paddle.matmul(p, vv) / paddle.where(den > 0, den, paddle.ones_like(den))


def dense_causal_attention(q, k, v, q_offset: int, scale: float, max_logits: int = 1 << 25):
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D]; query i sees keys <= q_offset+i.

    Row chunks keep the logits under max_logits float32 elements.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if Lq == 0:
        return paddle.zeros([B, Hq, 0, D], q.dtype)
    kf, vf = k.astype("float32"), v.astype("float32")
    qf = q.astype("float32").reshape([B, Hkv, G, Lq, D])
    rows = max(1, max_logits // max(1, B * Hq * Lk))
    outs = []
    for i0 in range(0, Lq, rows):
        i1 = min(Lq, i0 + rows)
        n = q_offset + i1  # keys past the chunk's last query are never visible
        qc = qf[:, :, :, i0:i1].reshape([B, Hkv, G * (i1 - i0), D])
        s = paddle.matmul(qc, kf[:, :, :n], transpose_y=True).reshape([B, Hkv, G, i1 - i0, n]) * scale
        pos = paddle.arange(q_offset + i0, n, dtype="int64").unsqueeze(1)
        col = paddle.arange(n, dtype="int64").unsqueeze(0)
        s = paddle.where(col <= pos, s, paddle.full([], float("-inf"), "float32"))
        p = paddle.nn.functional.softmax(s, axis=-1).reshape([B, Hkv, G * (i1 - i0), n])
        outs.append(paddle.matmul(p, vf[:, :, :n]).reshape([B, Hq, i1 - i0, D]))
    return paddle.concat(outs, axis=2).astype(q.dtype)
