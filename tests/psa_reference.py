"""PSA by its definition (shared/psa-algorithm.md), in float64 numpy: the one reference the tests
compare the plain-Paddle path and the Triton kernels against. Slow and simple on purpose.

Shapes follow ARCHITECTURE.md's seams, batch first: q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D],
importance and levels [B, Hq, nQB, nKB] (row r = absolute query block q_offset // blk + r),
cap [B, Hkv, nKB]. Query i sits at absolute position q_offset + i.
"""
from __future__ import annotations

import math

import numpy as np


def pad_replicate(x, blk):
    """[..., L, D] -> [..., ceil(L/blk)*blk, D], the last token repeated."""
    L = x.shape[-2]
    n = -(-L // blk) * blk
    if n == L:
        return x
    return np.concatenate([x, np.repeat(x[..., L - 1:L, :], n - L, axis=-2)], axis=-2)


def pool(x, r):
    """Mean over groups of r consecutive tokens (axis -2)."""
    *lead, L, D = x.shape
    return x.reshape(*lead, L // r, r, D).mean(axis=-2)


def importance(q, k, blk, S, q_offset):
    """Step 1: antidiagonal scores, causal row softmax of A/sqrt(D)/S, summed per block pair."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nKB = -(-Lk // blk)
    qb0 = q_offset // blk
    P = nKB * blk
    n, T = P // S, blk // S
    imp = np.zeros((B, Hq, nKB - qb0, nKB))
    for b in range(B):
        for h in range(Hq):
            qa = np.zeros((P, D))
            qa[q_offset:q_offset + Lq] = q[b, h]
            ka = np.zeros((P, D))
            ka[:Lk] = k[b, h // G]
            A = sum(qa[S - 1 - t::S] @ ka[t::S].T for t in range(S)) / math.sqrt(D) / S
            for i in range(qb0 * T, n):
                p = np.exp(A[i, :i + 1] - A[i, :i + 1].max())
                full = np.zeros(n)
                full[:i + 1] = p / p.sum()
                imp[b, h, i // T - qb0] += full.reshape(nKB, T).sum(1)
    return imp


def intervals(ratios):
    """(level, lower, hi) with lower = max(lo, previous hi), in the dict's order."""
    out, prev = [], None
    for level, (lo, hi) in ratios.items():
        out.append((int(level), lo if prev is None else max(lo, prev), hi))
        prev = hi
    return out


def raw_levels(imp, mode, ratios, qb0):
    """Step 2 without forced blocks or cap: per row, sort the causal blocks by importance
    (descending, ties by block index); energybound: E = float32 cumulative energy over the row's
    total (the algorithm computes it in float32), level where lower < E <= hi; topk: sorted
    position in [floor(n*lower), floor(n*hi)). A block in no interval gets 0."""
    B, H, nQB, nKB = imp.shape
    table = intervals(ratios)
    out = np.zeros(imp.shape, np.int64)
    for b in range(B):
        for h in range(H):
            for r in range(nQB):
                n = min(qb0 + r + 1, nKB)
                row = np.asarray(imp[b, h, r, :n], np.float32)
                order = sorted(range(n), key=lambda j: (-row[j], j))
                cum = np.cumsum(row[order], dtype=np.float32)
                E = cum / cum[-1] if cum[-1] > 0 else np.ones_like(cum)
                for pos, j in enumerate(order):
                    for level, lower, hi in table:
                        if mode == "energybound":
                            hit = lower < E[pos] <= hi
                        else:
                            hit = math.floor(n * lower) <= pos < math.floor(n * hi)
                        if hit:
                            out[b, h, r, j] = level
                            break
    return out


def force(lv, text_length, blk, qb0):
    """Step 3: prompt rows/columns, the diagonal and key block 0 at 1; above the diagonal 0."""
    lv = lv.copy()
    nQB, nKB = lv.shape[-2:]
    nt = -(-text_length // blk)
    for r in range(nQB):
        m = qb0 + r
        for kb in range(nKB):
            if m >= nKB - nt or kb >= nKB - nt or kb == m or kb == 0:
                lv[..., r, kb] = 1
            if kb > m:
                lv[..., r, kb] = 0
    return lv


def cap(k, blk, thresholds):
    """Step 4: per key block, 8 if sim8 > t8, else 4 if sim4 > t4, else 2 if sim2 > t2, else 1."""
    t2, t4, t8 = thresholds
    kp = pad_replicate(np.asarray(k, np.float64), blk)
    B, Hkv, P, D = kp.shape
    out = np.ones((B, Hkv, P // blk), np.int64)
    for b in range(B):
        for h in range(Hkv):
            for kb in range(P // blk):
                x = kp[b, h, kb * blk:(kb + 1) * blk]

                def sim(g, x=x):
                    a, c = x[0::g], x[g - 1::g]
                    n2 = (a * a).sum(1) * (c * c).sum(1)
                    return ((a * c).sum(1) / np.sqrt(np.maximum(n2, 1e-12))).mean()

                out[b, h, kb] = 8 if sim(8) > t8 else 4 if sim(4) > t4 else 2 if sim(2) > t2 else 1
    return out


def levels_from(imp, cp, q_offset, blk, text_length, mode, ratios):
    """Steps 2-4 from an importance map and an optional cap [B, Hkv, nKB]."""
    qb0 = q_offset // blk
    lv = force(raw_levels(imp, mode, ratios, qb0), text_length, blk, qb0)
    if cp is not None:
        G = imp.shape[1] // cp.shape[1]
        lv = np.minimum(lv, np.repeat(cp, G, axis=1)[:, :, None, :])
    return lv


def levels(q, k, cfg, q_offset):
    """Steps 1-4 for an AttentionConfig -> (importance, levels)."""
    blk = cfg.query_block
    imp = importance(q, k, blk, cfg.xattn_stride, q_offset)
    cp = (cap(k, blk, (cfg.sim_2x_threshold, cfg.sim_4x_threshold, cfg.sim_8x_threshold))
          if cfg.use_sim_cap else None)
    return imp, levels_from(imp, cp, q_offset, blk, cfg.text_length, cfg.mask_mode, cfg.mask_ratios)


def attention(q, k, v, levels, q_offset, scale, blk):
    """Step 5: per query block, every visible pooled key of every block at its level, logits
    + ln(r), one softmax; pooled key j of level r is visible to position p iff (j+1)*r - 1 <= p.
    A row that sees nothing gets zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kp, vp = pad_replicate(k, blk), pad_replicate(v, blk)
    qb0 = q_offset // blk
    out = np.zeros((B, Hq, Lq, D))
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            for r_ in range(levels.shape[2]):
                m = qb0 + r_
                pos = np.arange(max(m * blk, q_offset), min((m + 1) * blk, q_offset + Lq))
                if pos.size == 0:
                    continue
                qq = q[b, h, pos - q_offset]
                logits, vals = [], []
                for kb in range(min(m + 1, levels.shape[3])):
                    r = int(levels[b, h, r_, kb])
                    if r == 0:
                        continue
                    kr = kp[b, hk, kb * blk:(kb + 1) * blk].reshape(blk // r, r, D).mean(1)
                    vr = vp[b, hk, kb * blk:(kb + 1) * blk].reshape(blk // r, r, D).mean(1)
                    last = kb * blk + (np.arange(blk // r) + 1) * r - 1
                    s = qq @ kr.T * scale + math.log(r)
                    logits.append(np.where(last[None, :] <= pos[:, None], s, -np.inf))
                    vals.append(vr)
                if not logits:
                    continue
                s = np.concatenate(logits, 1)
                mx = s.max(1, keepdims=True)
                seen = np.isfinite(mx[:, 0])
                p = np.exp(s - np.where(np.isfinite(mx), mx, 0.0))
                den = p.sum(1, keepdims=True)
                o = (p / np.where(den > 0, den, 1.0)) @ np.concatenate(vals, 0)
                out[b, h, pos - q_offset] = np.where(seen[:, None], o, 0.0)
    return out


def dense(q, k, v, q_offset, scale):
    """Dense causal attention, query i at position q_offset + i."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Hq, Lq, D = q.shape
    G = Hq // k.shape[1]
    out = np.zeros(q.shape)
    visible = np.arange(k.shape[2])[None, :] <= q_offset + np.arange(Lq)[:, None]
    for b in range(B):
        for h in range(Hq):
            s = np.where(visible, q[b, h] @ k[b, h // G].T * scale, -np.inf)
            p = np.exp(s - s.max(1, keepdims=True))
            out[b, h] = (p / p.sum(1, keepdims=True)) @ v[b, h // G]
    return out
