"""PSA steps 1-4 on the GPU in Triton: importance estimate, similarity cap, levels.

Public entry point: :func:`estimate_levels_triton` ``(q, k, cfg, q_offset) -> (levels, importance)``
with the seams of ARCHITECTURE.md (``levels int8 [B, Hq, nQB, nKB]``, ``importance float32``
same shape). Three launches, no host synchronisation:

1. ``_cap_kernel`` (if ``cfg.use_sim_cap``): per (b, kv head, key block) the mean cosine
   similarities of tokens (2i, 2i+1), (4i, 4i+3), (8i, 8i+7) and the cap 8/4/2/1.
2. ``_importance_kernel``: XAttention antidiagonal scores. For strided query row i and strided
   key j, ``A[i,j] = sum_t q[i*S+S-1-t] . k[j*S+t]`` (positions absolute; q is zero outside
   ``[q_offset, Lk)``, k is zero past ``Lk``, i.e. both zero-padded to a multiple of the block).
   One program owns BM strided query rows and makes two passes over the causal key tiles:
   pass 1 keeps the online row max and row sum of ``exp(A/sqrt(d)/S)`` (j <= i), pass 2
   recomputes the scores, normalises them and sums them into ``(BLK/S) x (BLK/S)`` tiles, one
   number per block pair. The ``(L/S) x (L/S)`` matrix never reaches memory.
3. ``_levels_kernel``: one program per query-block row. The row's causal blocks are sorted by
   importance (descending; ties by key block, ascending) with ``tl.sort`` over an int64 key
   ``(float bits << 32) | (NP - 1 - kb)``; then float32 cumulative energy (energybound) or
   sorted position (topk) picks the level, the similarity cap is applied, then the forced
   blocks (text rows/columns, diagonal, key block 0 -> 1; above the diagonal -> 0), and the
   levels are scattered back to key-block order.
"""

from __future__ import annotations

import math
import warnings

from . import launch as _launch
from . import tiles as _tiles
from .config import DEFAULT_MASK_RATIOS, ratio_intervals

_launch.prepare_triton()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["estimate_levels_triton", "importance_triton", "similarity_cap_triton", "levels_from_importance_triton"]

_LOG2E = 1.4426950408889634
# (BM strided query rows, BN strided key rows, num_warps, num_stages[, passes[, variant]]); tuned on
# an H200. variant: None = TMA loads on Hopper when the strided views are exact, "plain", "tma".
# passes: 1 = one pass with a float32 scratch of per-(row, key block) log-sums (default), 2 = the
# scratch-free two-pass kernel.
DEFAULT_EST_TILES = (64, 128, 4, 4, 1)
_INTERP_EST_TILES = (32, 32, 4, 1, 1)
# bound on the one-pass scratch per launch; larger problems run in several launches over heads
SCRATCH_BYTES = 256 << 20


# ============================================================================================
# kernels
# ============================================================================================

@triton.jit
def _cos_mean(base, s_n, first, Lk, STEP: tl.constexpr, GAP: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    """mean_i cos(x[first + STEP*i], x[first + STEP*i + GAP]) over N pairs (replicated past Lk)."""
    offs_d = tl.arange(0, D)
    r = first + tl.arange(0, N) * STEP
    a = tl.load(base + tl.minimum(r, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
    c = tl.load(base + tl.minimum(r + GAP, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
    dot = tl.sum(a * c, 1)
    n2 = tl.sum(a * a, 1) * tl.sum(c * c, 1)
    cos = dot / tl.sqrt(tl.maximum(n2, 1e-12))  # 0 for a zero key
    return tl.sum(cos, 0) / N


@triton.jit
def _cap_kernel(K, CAP, skb, skh, skn, Hkv, Lk, nKB, t2, t4, t8, BLK: tl.constexpr, D: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    first = kb * BLK
    s2 = _cos_mean(base, skn, first, Lk, 2, 1, BLK // 2, D)
    s4 = _cos_mean(base, skn, first, Lk, 4, 3, BLK // 4, D)
    s8 = _cos_mean(base, skn, first, Lk, 8, 7, BLK // 8, D)
    cap = tl.where(s8 > t8, 8, tl.where(s4 > t4, 4, tl.where(s2 > t2, 2, 1)))
    tl.store(CAP + bh.to(tl.int64) * nKB + kb, cap.to(tl.int8))


@triton.jit
def _strided_scores(qbase, kbase, sqm, skn, offs_i, offs_j, offs_d, q_offset, Lq, Lk,
                    S: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    a = tl.zeros([BM, BN], dtype=tl.float32)
    for s in range(0, S):
        ql = offs_i * S + (S - 1 - s) - q_offset
        qv = tl.load(qbase + ql[:, None] * sqm + offs_d[None, :], mask=((ql >= 0) & (ql < Lq))[:, None], other=0.0)
        kp = offs_j * S + s
        kv = tl.load(kbase + kp[:, None] * skn + offs_d[None, :], mask=(kp < Lk)[:, None], other=0.0)
        a = tl.dot(qv, tl.trans(kv), a)
    return a


@triton.jit
def _strided_scores_tma(desc_q, desc_k, bhq, bhk, qrow, krow, S: tl.constexpr, D: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr):
    """As :func:`_strided_scores` through TMA descriptors over ``[B*H, L/S, S*D]`` views: strided
    row i's token ``i*S + u`` is column block u; rows outside a head's range are TMA's zero fill."""
    a = tl.zeros([BM, BN], dtype=tl.float32)
    for s in range(0, S):
        qv = tl.reshape(desc_q.load([bhq, qrow, (S - 1 - s) * D]), (BM, D))
        kv = tl.reshape(desc_k.load([bhk, krow, s * D]), (BN, D))
        a = tl.dot(qv, tl.trans(kv), a)
    return a


@triton.jit
def _importance_kernel(Q, K, IMP, sqb, sqh, sqm, skb, skh, skn,
                       H, G, Lq, Lk, q_offset, qb0, nQB, nKB, qk_scale,
                       D: tl.constexpr, S: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    n_rows = nKB * R
    row0 = qb0 * R
    offs_i = row0 + t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    qbase = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kbase = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    i_hi = tl.minimum(row0 + (t + 1) * BM, n_rows) - 1
    n_jt = i_hi // BN + 1

    m_i = tl.zeros([BM], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BM], dtype=tl.float32)
    for jt in range(0, n_jt):
        offs_j = jt * BN + tl.arange(0, BN)
        x = _strided_scores(qbase, kbase, sqm, skn, offs_i, offs_j, offs_d, q_offset, Lq, Lk, S, BM, BN)
        x = tl.where(offs_j[None, :] <= offs_i[:, None], x * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(x - m_new[:, None]), 1)
        m_i = m_new
    inv_l = 1.0 / l_i

    NBM: tl.constexpr = BM // R
    NBN: tl.constexpr = BN // R
    qb_loc = (row0 + t * BM) // R + tl.arange(0, NBM) - qb0  # importance row
    imp_rows = IMP + (bh.to(tl.int64) * nQB + qb_loc)[:, None] * nKB
    for jt in range(0, n_jt):
        offs_j = jt * BN + tl.arange(0, BN)
        x = _strided_scores(qbase, kbase, sqm, skn, offs_i, offs_j, offs_d, q_offset, Lq, Lk, S, BM, BN)
        x = tl.where(offs_j[None, :] <= offs_i[:, None], x * qk_scale, float("-inf"))
        p = tl.math.exp2(x - m_i[:, None]) * inv_l[:, None]
        ps = tl.sum(tl.reshape(p, (NBM, R, BN)), 1)
        ps = tl.sum(tl.reshape(ps, (NBM, NBN, R)), 2)
        kbs = jt * NBN + tl.arange(0, NBN)
        ok = (qb_loc < nQB)[:, None] & (kbs < nKB)[None, :]
        tl.store(imp_rows + kbs[None, :], ps, mask=ok)


@triton.jit
def _importance1_kernel(Q, K, IMP, SCR, desc_q, desc_k, sqb, sqh, sqm, skb, skh, skn,
                        H, G, bh0, n_t, Lq, Lk, q_offset, qb0, nQB, nKB, qk_scale,
                        D: tl.constexpr, S: tl.constexpr, R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        USE_TMA: tl.constexpr = False):
    """One pass over the causal key tiles (the two-pass kernel above computes the scores twice).

    Per strided query row i and key block kb it keeps the block's log2-sum-exp2 of the scores,
    ``lse[i, kb] = m + log2(sum_{j in kb} exp2(x_ij - m))`` with m the tile's row max, in a
    float32 scratch ``SCR [heads of this launch, n_t*BM, nKB]``, next to the online row
    max/sum. After the loop the row's log-normaliser ``LSE_i`` is known and the program reads its
    own scratch rows back: ``Imp[qb, kb] = sum_{i in qb} exp2(lse[i, kb] - LSE_i)``, which is the
    same sum of softmax probabilities as the two-pass kernel.
    """
    t = n_t - 1 - tl.program_id(0)  # heaviest (latest) row tiles first
    hh = tl.program_id(1)
    bh = bh0 + hh
    b = bh // H
    h = bh % H
    hk = h // G
    n_rows = nKB * R
    row0 = qb0 * R
    offs_i = row0 + t * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    qbase = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    kbase = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    i_hi = tl.minimum(row0 + (t + 1) * BM, n_rows) - 1
    n_jt = i_hi // BN + 1
    NBM: tl.constexpr = BM // R
    NBN: tl.constexpr = BN // R
    scr_rows = SCR + (hh.to(tl.int64) * n_t * BM + t * BM + tl.arange(0, BM))[:, None] * nKB

    m_i = tl.zeros([BM], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BM], dtype=tl.float32)
    for jt in range(0, n_jt):
        offs_j = jt * BN + tl.arange(0, BN)
        if USE_TMA:
            x = _strided_scores_tma(desc_q, desc_k, bh, b * (H // G) + hk, row0 + t * BM - q_offset // S, jt * BN,
                                    S, D, BM, BN)
        else:
            x = _strided_scores(qbase, kbase, sqm, skn, offs_i, offs_j, offs_d, q_offset, Lq, Lk, S, BM, BN)
        x = tl.where(offs_j[None, :] <= offs_i[:, None], x * qk_scale, float("-inf"))
        m_t = tl.max(x, 1)
        m_t = tl.where(m_t > -1.0e30, m_t, -1.0e30)  # rows with every key of the tile masked
        p = tl.math.exp2(x - m_t[:, None])
        sb = tl.sum(tl.reshape(p, (BM, NBN, R)), 2)  # [BM, NBN] block sums relative to m_t
        m_new = tl.maximum(m_i, m_t)
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(sb, 1) * tl.math.exp2(m_t - m_new)
        m_i = m_new
        kbs = jt * NBN + tl.arange(0, NBN)
        lse = tl.where(sb > 0.0, m_t[:, None] + tl.math.log2(sb), float("-inf"))
        tl.store(scr_rows + kbs[None, :], lse, mask=(kbs < nKB)[None, :])
    lse_row = m_i + tl.math.log2(l_i)
    tl.debug_barrier()  # the scratch rows were written by other threads of this program

    qb_loc = (row0 + t * BM) // R + tl.arange(0, NBM) - qb0  # importance row
    imp_rows = IMP + (bh.to(tl.int64) * nQB + qb_loc)[:, None] * nKB
    for jt in range(0, n_jt):
        kbs = jt * NBN + tl.arange(0, NBN)
        lse = tl.load(scr_rows + kbs[None, :], mask=(kbs < nKB)[None, :], other=float("-inf"))
        p = tl.math.exp2(lse - lse_row[:, None])
        ps = tl.sum(tl.reshape(p, (NBM, R, NBN)), 1)
        ok = (qb_loc < nQB)[:, None] & (kbs < nKB)[None, :]
        tl.store(imp_rows + kbs[None, :], ps, mask=ok)


@triton.jit
def _assign(lev, done, x, lo, hi, V: tl.constexpr, TOPK: tl.constexpr):
    if TOPK:
        hit = (x >= lo) & (x < hi)
    else:
        hit = (x > lo) & (x <= hi)
    hit = hit & (done == 0)
    lev = tl.where(hit, V, lev)
    done = tl.where(hit, 1, done)
    return lev, done


@triton.jit
def _levels_kernel(IMP, CAP, LEV, CUTS, Hq, G, qb0, nQB, nKB, n_text,
                   lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3, lo4, hi4,
                   V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr, V3: tl.constexpr, V4: tl.constexpr,
                   NR: tl.constexpr, TOPK: tl.constexpr, USE_CAP: tl.constexpr, NP: tl.constexpr):
    row = tl.program_id(0)
    qrow = row % nQB
    bh = row // nQB
    b = bh // Hq
    h = bh % Hq
    qblk = qb0 + qrow
    kb = tl.arange(0, NP)
    valid = kb <= qblk  # qblk < nKB
    rbase = row.to(tl.int64) * nKB
    imp = tl.load(IMP + rbase + kb, mask=valid, other=0.0)
    imp = tl.where(imp > 0.0, imp, 0.0)  # also maps -0.0 and NaN to +0.0
    bits = imp.to(tl.int32, bitcast=True).to(tl.int64)
    kb64 = kb.to(tl.int64)
    key = tl.where(valid, (bits << 32) + (NP - 1 - kb64), -1 - kb64)
    sk = tl.sort(key, descending=True)
    ok = sk >= 0
    hi_bits = sk >> 32
    idx = tl.where(ok, NP - 1 - (sk - (hi_bits << 32)), -1 - sk).to(tl.int32)
    val = tl.where(ok, hi_bits.to(tl.int32).to(tl.float32, bitcast=True), 0.0)

    if TOPK:
        # cut points floor(n*lo), floor(n*hi) for n = qblk + 1 valid blocks, from a float64
        # host table [nKB + 1, 10]; compared with the position in the sorted order
        x = tl.arange(0, NP).to(tl.float32)
        crow = CUTS + (qblk + 1) * 10
        lo0 = tl.load(crow + 0).to(tl.float32)
        hi0 = tl.load(crow + 1).to(tl.float32)
        lo1 = tl.load(crow + 2).to(tl.float32)
        hi1 = tl.load(crow + 3).to(tl.float32)
        lo2 = tl.load(crow + 4).to(tl.float32)
        hi2 = tl.load(crow + 5).to(tl.float32)
        lo3 = tl.load(crow + 6).to(tl.float32)
        hi3 = tl.load(crow + 7).to(tl.float32)
        lo4 = tl.load(crow + 8).to(tl.float32)
        hi4 = tl.load(crow + 9).to(tl.float32)
    else:
        cum = tl.cumsum(val, 0)
        total = tl.max(cum, 0)
        x = tl.where(total > 0.0, cum / total, 1.0)

    lev = tl.zeros([NP], dtype=tl.int32)
    done = tl.zeros([NP], dtype=tl.int32)
    if NR > 0:
        lev, done = _assign(lev, done, x, lo0, hi0, V0, TOPK)
    if NR > 1:
        lev, done = _assign(lev, done, x, lo1, hi1, V1, TOPK)
    if NR > 2:
        lev, done = _assign(lev, done, x, lo2, hi2, V2, TOPK)
    if NR > 3:
        lev, done = _assign(lev, done, x, lo3, hi3, V3, TOPK)
    if NR > 4:
        lev, done = _assign(lev, done, x, lo4, hi4, V4, TOPK)

    if USE_CAP:
        Hkv = Hq // G
        cap = tl.load(CAP + (b * Hkv + h // G).to(tl.int64) * nKB + idx, mask=ok, other=8).to(tl.int32)
        lev = tl.minimum(lev, cap)
    text0 = nKB - n_text
    forced = (idx == 0) | (idx == qblk) | (idx >= text0) | (qblk >= text0)
    lev = tl.where(forced, 1, lev)
    lev = tl.where(ok, lev, 0)
    tl.store(LEV + rbase + idx, lev.to(tl.int8), mask=(idx >= 0) & (idx < nKB))


# ============================================================================================
# host side
# ============================================================================================

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _ratio_table(ratios, topk: bool):
    """[(level, lower, hi)]: the config's one interval rule (at most 5 entries)."""
    out = list(ratio_intervals(ratios))
    if len(out) > 5:
        raise ValueError("at most 5 mask_ratios entries are supported")
    return out


def similarity_cap_triton(k, block: int, thresholds=(0.75, 0.7, 0.7)):
    """``cap int8 [B, Hkv, nKB]`` in {1, 2, 4, 8} (step 4)."""
    B, Hkv, Lk, D = (int(s) for s in k.shape)
    nKB = -(-Lk // block)
    cap = _launch.empty(k, [B, Hkv, nKB], "int8")
    sk = _launch.strides(k)
    t2, t4, t8 = (float(t) for t in thresholds)
    _launch.launch(_cap_kernel, (nKB, B * Hkv), k, cap, sk[0], sk[1], sk[2], Hkv, Lk, nKB, t2, t4, t8,
                   BLK=block, D=D, num_warps=4)
    return cap


def importance_triton(q, k, block: int, stride: int, q_offset: int, *, tiles=None):
    """``importance float32 [B, Hq, nQB, nKB]`` (step 1), fused antidiagonal scoring.

    ``tiles = (BM, BN, num_warps, num_stages[, passes])``; passes 1 (default tiles) or 2 (also what
    a 4-tuple means). Without explicit tiles, a one-pass kernel that fails to build falls back to two.
    """
    global _ONE_PASS_BROKEN, _EST_TMA_BROKEN
    explicit = tiles is not None
    B, Hq, Lq, D = (int(s) for s in q.shape)
    _, Hkv, Lk, _ = (int(s) for s in k.shape)
    if block % stride or (block // stride) & (block // stride - 1):
        raise ValueError(f"block {block} / stride {stride} must be a power of two")
    R = block // stride
    nKB = -(-Lk // block)
    qb0 = q_offset // block
    nQB = nKB - qb0
    if tiles is None:
        tiles = _tiles.estimate_tiles(q)  # per GPU class (psa_paddle/tiles.py)
    bm, bn, warps, stages = tiles[:4]
    passes = int(tiles[4]) if len(tiles) > 4 else 2
    variant = tiles[5] if len(tiles) > 5 else None
    if variant not in (None, "plain", "tma"):
        raise ValueError(f"estimate variant {variant!r} not in ('plain', 'tma')")
    bm, bn = max(bm, R, 16), max(bn, R, 16)
    sq, sk = _launch.strides(q), _launch.strides(k)
    n_t = -(-(nQB * R) // bm)
    qk_scale = _LOG2E / math.sqrt(D) / stride
    failed = []  # faster kernels that could not run here, said once a slower one has
    if passes == 1 and _ONE_PASS_BROKEN is None:
        tma = _est_tma(q, k, stride, q_offset, variant) and _EST_TMA_BROKEN is None
        for use_tma in ((True, False) if tma else (False,)):
            try:
                imp = _importance_one_pass(q, k, B, Hq, Hkv, Lq, Lk, D, q_offset, qb0, nQB, nKB, stride, R, n_t,
                                           qk_scale, sq, sk, bm, bn, warps, stages, use_tma)
                _note_fallbacks(failed)
                return imp
            except Exception as ex:  # a Triton that cannot build it: the next kernel, from now on
                if explicit:
                    raise
                if type(ex).__name__ != "OutOfResources":
                    err = f"{type(ex).__name__}: {str(ex)[:300]}"
                    if use_tma:
                        _EST_TMA_BROKEN = err
                    else:
                        _ONE_PASS_BROKEN = err
                failed.append(f"one-pass importance kernel (tma={use_tma}): {type(ex).__name__}")
    imp = _launch.zeros(q, [B, Hq, nQB, nKB], "float32")
    _launch.launch(_importance_kernel, (n_t, B * Hq), q, k, imp, sq[0], sq[1], sq[2], sk[0], sk[1], sk[2],
                   Hq, Hq // Hkv, Lq, Lk, q_offset, qb0, nQB, nKB, qk_scale,
                   D=D, S=stride, R=R, BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    _note_fallbacks(failed)
    return imp


def _note_fallbacks(failed: list):
    """One warning for the faster kernels that failed, once a slower one has run: if every kernel
    fails, psa.py's one warning says so instead."""
    if failed:
        warnings.warn(f"PSA: {'; '.join(failed)} failed; using a slower importance kernel", stacklevel=3)


_ONE_PASS_BROKEN = None  # set (to the error) when the one-pass kernel failed to build in this process
_EST_TMA_BROKEN = None  # the same for its TMA variant


def _est_tma(q, k, S, q_offset, variant):
    """TMA loads for the one-pass kernel: Hopper (auto) or asked for, contiguous q/k, and the
    strided views exact (Lq, Lk, q_offset multiples of the stride)."""
    if variant == "plain" or _launch.interpreting():
        return False
    if variant is None:
        cc = _launch.device_capability(q)
        if cc is None or cc[0] != 9:  # auto: Hopper only, as the attention kernel
            return False
    Lq, Lk = int(q.shape[2]), int(k.shape[2])
    return Lq % S == 0 and Lk % S == 0 and q_offset % S == 0 and _launch.tma_ready(q, k)


def _strided_desc(t, S, rows):
    """3-D descriptor over a contiguous ``[B, H, L, D]`` tensor viewed as ``[B*H, L/S, S*D]``."""
    B, H, L, D = (int(x) for x in t.shape)
    return _launch.tensor_descriptor(t, [B * H, L // S, S * D], [L * D, S * D, 1], [1, rows, D])


def _importance_one_pass(q, k, B, Hq, Hkv, Lq, Lk, D, q_offset, qb0, nQB, nKB, stride, R, n_t, qk_scale, sq, sk,
                         bm, bn, warps, stages, tma=False):
    imp = _launch.zeros(q, [B, Hq, nQB, nKB], "float32")  # blocks past a row tile's last key tile stay 0
    per_head = n_t * bm * nKB * 4
    chunk = max(1, min(B * Hq, SCRATCH_BYTES // per_head))
    scr = _launch.empty(q, [chunk * n_t * bm, nKB], "float32")
    for bh0 in range(0, B * Hq, chunk):
        nh = min(chunk, B * Hq - bh0)
        dq = _strided_desc(q, stride, bm) if tma else None
        dk = _strided_desc(k, stride, bn) if tma else None
        _launch.launch(_importance1_kernel, (n_t, nh), q, k, imp, scr, dq, dk, sq[0], sq[1], sq[2], sk[0], sk[1], sk[2],
                       Hq, Hq // Hkv, bh0, n_t, Lq, Lk, q_offset, qb0, nQB, nKB, qk_scale,
                       D=D, S=stride, R=R, BM=bm, BN=bn, USE_TMA=tma, num_warps=warps, num_stages=stages)
    return imp


_CUTS_CACHE: dict = {}


def _topk_cuts(like, table, nKB):
    """int32 [nKB + 1, 10]: row n holds floor(n*lo_i), floor(n*hi_i) in float64 (host, cached)."""
    import numpy as np

    key = (tuple(table), nKB, _launch.device_key(like))
    t = _CUTS_CACHE.get(key)
    if t is None:
        n = np.arange(nKB + 1, dtype=np.float64)[:, None]
        lohi = np.array([[lo, hi] for _, lo, hi in table], dtype=np.float64).reshape(1, -1)
        t = _launch.to_device(like, np.floor(n * lohi).astype(np.int32))
        if len(_CUTS_CACHE) > 64:
            _CUTS_CACHE.clear()
        _CUTS_CACHE[key] = t
    return t


LEVELS_WARPS = 4  # warps of the per-row sort-and-assign kernel


def levels_from_importance_triton(imp, cap, q_offset: int, block: int, *, text_length=512, mask_mode="energybound",
                                  mask_ratios=None, n_kv_heads=None, num_warps=None):
    """``levels int8 [B, Hq, nQB, nKB]`` (steps 2-4) from importance and the optional cap."""
    B, Hq, nQB, nKB = (int(s) for s in imp.shape)
    if mask_mode not in ("energybound", "topk"):
        raise ValueError(f"unknown mask_mode {mask_mode!r}")
    topk = mask_mode == "topk"
    table = _ratio_table(mask_ratios if mask_ratios is not None else DEFAULT_MASK_RATIOS, topk)
    nr = len(table)
    table = table + [(0, 0.0, 0.0)] * (5 - nr)
    vals = {}
    for i, (lev, lo, hi) in enumerate(table):
        vals[f"lo{i}"], vals[f"hi{i}"], vals[f"V{i}"] = lo, hi, lev
    use_cap = cap is not None
    G = Hq // int(cap.shape[1]) if use_cap else (Hq // n_kv_heads if n_kv_heads else 1)
    lev = _launch.empty(imp, [B, Hq, nQB, nKB], "int8")
    n_text = min(nKB, -(-int(text_length) // block)) if text_length else 0
    cuts = _topk_cuts(imp, table, nKB) if topk else imp
    _launch.launch(_levels_kernel, (B * Hq * nQB,), imp, cap if use_cap else imp, lev, cuts,
                   Hq, G, q_offset // block, nQB, nKB, n_text,
                   vals["lo0"], vals["hi0"], vals["lo1"], vals["hi1"], vals["lo2"], vals["hi2"],
                   vals["lo3"], vals["hi3"], vals["lo4"], vals["hi4"],
                   V0=vals["V0"], V1=vals["V1"], V2=vals["V2"], V3=vals["V3"], V4=vals["V4"],
                   NR=nr, TOPK=topk, USE_CAP=use_cap, NP=max(16, _pow2_at_least(nKB)),
                   num_warps=num_warps or LEVELS_WARPS)
    return lev


def estimate_levels_triton(q, k, cfg, q_offset, *, tiles=None):
    """PSA steps 1-4 -> ``(levels int8 [B, Hq, nQB, nKB], importance float32 [B, Hq, nQB, nKB])``.

    ``cfg`` is the caller's ``AttentionConfig``: the one source of the PSA settings.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError("q and k must be 4-D")
    B, Hq, Lq, D = (int(s) for s in q.shape)
    Bk, Hkv, Lk, Dk = (int(s) for s in k.shape)
    if Bk != B or Dk != D or Hq % Hkv:
        raise ValueError(f"shape mismatch: q {list(q.shape)}, k {list(k.shape)}")
    q_offset = int(q_offset)
    if q_offset < 0 or q_offset + Lq != Lk:
        raise ValueError(f"need q_offset = Lk - Lq >= 0, got q_offset={q_offset}, Lq={Lq}, Lk={Lk}")
    block = int(cfg.query_block)
    stride = int(cfg.xattn_stride)
    if block < 16 or block & (block - 1):
        raise ValueError(f"query_block must be a power of two >= 16, got {block}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    q = _launch.ensure_last_dim_contiguous(q)
    k = _launch.ensure_last_dim_contiguous(k)

    imp = importance_triton(q, k, block, stride, q_offset, tiles=tiles)
    cap = None
    if cfg.use_sim_cap:
        th = (cfg.sim_2x_threshold, cfg.sim_4x_threshold, cfg.sim_8x_threshold)
        cap = similarity_cap_triton(k, block, th)
    lev = levels_from_importance_triton(
        imp, cap, q_offset, block,
        text_length=cfg.text_length,
        mask_mode=cfg.mask_mode,
        mask_ratios=cfg.mask_ratios,
        n_kv_heads=Hkv,
    )
    return lev, imp
