"""Pyramid block-sparse attention forward (PSA step 5) in Triton.

Public entry point: :func:`pyramid_attention_triton` ``(q, k, v, levels, q_offset, scale) -> out``
with the seams of ARCHITECTURE.md:

* ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lk, D]`` (Paddle or, in the GPU bench, PyTorch tensors;
  bf16/fp16 on GPU, fp32 too in the interpreter), ``Hq % Hkv == 0`` (query head ``h`` reads kv
  head ``h // (Hq // Hkv)``; K/V are never repeated);
* query ``i`` sits at absolute position ``q_offset + i``; blocks of ``BLK`` are aligned to absolute
  positions; ``levels [B, Hq, nQB, nKB]`` int8 in {0,1,2,4,8}, row ``r`` = absolute query block
  ``q_offset // BLK + r``.

Three launches, none of which needs the host to look at device data:

1. ``_pyramid_kernel``: K/V padded to a multiple of BLK by replicating the last token and
   mean-pooled in pairs three times (levels 2, 4, 8), into one buffer per tensor
   ``[B, Hkv, Lp/2 + Lp/4 + Lp/8, D]`` (``Lp = nKB * BLK``).
2. ``_lut_kernel``: per (b, h, query-block row) the strictly-below-diagonal key blocks with a
   non-zero level, compacted and grouped by level (1, 2, 4, 8), plus the four counts. The
   diagonal block is left out: the attention kernel handles it with the causal mask.
3. ``_attn_kernel``: one program per (query tile of BLOCK_M rows, b*Hq). It walks the four level
   lists without any masking (every key of a block below the diagonal is in the past of every
   query of the tile), then the diagonal block at its own level with the pooled-key causality
   rule ``(j+1)*r - 1 <= pos``. Logits of level r get ``+ln(r)``; the online softmax runs in base
   2 with log2(e) folded into the scale.
"""

from __future__ import annotations

import warnings

from . import launch as _launch
from . import tiles as _tiles
from .config import block_from_levels_shape

_launch.prepare_triton()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["pyramid_attention_triton", "dense_attention_triton", "build_pyramid", "build_level_lut", "infer_block_size"]

_LOG2E = 1.4426950408889634

# Hopper defaults, tuned on an H200 (bench/RESULTS.md); the bench overrides them via ``tiles=``.
# (BLOCK_M, BLOCK_N level-1 tile, BLOCK_NP pooled tile, num_warps, num_stages), by head_dim.
# 128x128 tiles with two warpgroups won both on the PSA mask and dense (all level 1); 64x64 /
# 4 warps was within 1% on the PSA mask.
DEFAULT_TILES = {64: (128, 128, 64, 8, 3), 128: (128, 128, 64, 8, 3)}
DENSE_TILES = {64: (128, 128, 64, 8, 3), 128: (128, 128, 64, 8, 3)}
_INTERP_TILES = (64, 32, 32, 4, 1)
# Hopper (sm_90) with TMA tensor descriptors for Q and the level-1 K/V tiles: 64x64 tiles, one
# warpgroup, 3 stages won on an H200 both on the PSA mask and with every block at level 1
# (bench/RESULTS.md, Runs 7 and 8). Used when ``use_tma`` resolves to True and no ``tiles`` are given.
HOPPER_TMA_TILES = {64: (64, 64, 64, 4, 3), 128: (64, 64, 64, 4, 3)}
# Triton's warp specialisation of the level-1 loop on the TMA path: Run 8's table ran with it; on
# the H200 (Triton 3.6) it timed within run-to-run noise of the same kernel without it.
HOPPER_WARP_SPECIALIZE = True
# 6th element of ``tiles`` (optional): kernel variant
_VARIANTS = ("plain", "tma", "tma_ws")


# ============================================================================================
# kernels
# ============================================================================================

@triton.jit
def _pyramid_kernel(K, V, PK, PV,
                    skb, skh, skn, svb, svh, svn,
                    Hkv, Lk, NPYR, OFF4, OFF8,
                    BLK: tl.constexpr, D: tl.constexpr):
    """One program per (key block, b*Hkv): pooled rows of levels 2, 4, 8 for K and V."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    E: tl.constexpr = BLK // 8
    offs_e = tl.arange(0, E)
    offs_d = tl.arange(0, D)
    base_tok = kb * BLK + offs_e * 8
    out_base = bh.to(tl.int64) * NPYR * D
    for which in tl.static_range(2):
        if which == 0:
            src = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
            s_n = skn
            dst = PK + out_base
        else:
            src = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
            s_n = svn
            dst = PV + out_base
        # x{s}: token 8e+s of the block, replicated past the end of the sequence
        x0 = tl.load(src + tl.minimum(base_tok + 0, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        x1 = tl.load(src + tl.minimum(base_tok + 1, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        x2 = tl.load(src + tl.minimum(base_tok + 2, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        x3 = tl.load(src + tl.minimum(base_tok + 3, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        x4 = tl.load(src + tl.minimum(base_tok + 4, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        x5 = tl.load(src + tl.minimum(base_tok + 5, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        x6 = tl.load(src + tl.minimum(base_tok + 6, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        x7 = tl.load(src + tl.minimum(base_tok + 7, Lk - 1)[:, None] * s_n + offs_d[None, :]).to(tl.float32)
        ty = PK.dtype.element_ty
        # exact float32 means of the original tokens, rounded once to the storage dtype
        a0 = (x0 + x1) * 0.5
        a1 = (x2 + x3) * 0.5
        a2 = (x4 + x5) * 0.5
        a3 = (x6 + x7) * 0.5
        r2 = kb * (BLK // 2) + offs_e * 4
        tl.store(dst + (r2 + 0)[:, None] * D + offs_d[None, :], a0.to(ty))
        tl.store(dst + (r2 + 1)[:, None] * D + offs_d[None, :], a1.to(ty))
        tl.store(dst + (r2 + 2)[:, None] * D + offs_d[None, :], a2.to(ty))
        tl.store(dst + (r2 + 3)[:, None] * D + offs_d[None, :], a3.to(ty))
        b0 = (a0 + a1) * 0.5
        b1 = (a2 + a3) * 0.5
        r4 = OFF4 + kb * (BLK // 4) + offs_e * 2
        tl.store(dst + (r4 + 0)[:, None] * D + offs_d[None, :], b0.to(ty))
        tl.store(dst + (r4 + 1)[:, None] * D + offs_d[None, :], b1.to(ty))
        c0 = ((b0 + b1) * 0.5).to(ty)
        r8 = OFF8 + kb * (BLK // 8) + offs_e
        tl.store(dst + r8[:, None] * D + offs_d[None, :], c0)


@triton.jit
def _lut_kernel(LEV, LUT, CNT, slb, slh, slr, H, qb0, nQB, nKB, NP: tl.constexpr):
    """Per (b, h, row): key blocks kb < diagonal with level r, grouped 1 | 2 | 4 | 8."""
    row = tl.program_id(0)
    qrow = row % nQB
    bh = row // nQB
    b = bh // H
    h = bh % H
    qblk = qb0 + qrow
    kb = tl.arange(0, NP)
    inside = (kb < nKB) & (kb < qblk)
    lev = tl.load(LEV + b.to(tl.int64) * slb + h.to(tl.int64) * slh + qrow.to(tl.int64) * slr + kb,
                  mask=inside, other=0).to(tl.int32)
    lut_row = LUT + row.to(tl.int64) * nKB
    base = 0
    for i in tl.static_range(4):
        sel = (lev == (1 << i)) & inside
        seli = sel.to(tl.int32)
        pos = tl.cumsum(seli, axis=0) - 1
        tl.store(lut_row + base + pos, kb, mask=sel)
        n = tl.sum(seli, axis=0)
        tl.store(CNT + row * 4 + i, n)
        base += n


@triton.jit
def _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, LOG2R: tl.constexpr, mask, HAS_MASK: tl.constexpr):
    """One online-softmax step over a key tile: logits*scale*log2e + log2(r).

    Unmasked tiles take the row max of the raw scores (scale > 0, so max(x)*s == max(x*s)) and
    fold scale, log2(r) and the new max into one multiply-add per logit.
    """
    qk = tl.dot(q, tl.trans(k))
    if HAS_MASK:
        if LOG2R != 0.0:
            qk = qk * qk_scale + LOG2R
        else:
            qk = qk * qk_scale
        qk = tl.where(mask, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale + LOG2R)
        p = tl.math.exp2(qk * qk_scale - (m_ij - LOG2R)[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_ij, l_i


@triton.jit
def _level1_blocks(acc, m_i, l_i, q, lut, cnt, qblk, kbase, vbase, s_kn, s_vn, offs_d, qk_scale,
                   desc_k, desc_v, kv_row0,
                   BLK: tl.constexpr, TILE: tl.constexpr, USE_TMA: tl.constexpr, WS: tl.constexpr):
    """The level-1 key blocks below the diagonal (full resolution, no mask).

    When every block below the diagonal is level 1 (``cnt == qblk``: the LUT is 0..qblk-1 in
    order) the keys are walked as one contiguous range without reading the LUT, in the same
    order, so the result is the same. With ``USE_TMA`` (Hopper) tiles come through tensor
    descriptors over the flattened ``[B*Hkv*Lk, D]`` K and V (``kv_row0`` = this head's row 0).
    """
    SUB: tl.constexpr = BLK // TILE
    offs_n = tl.arange(0, TILE)
    if cnt == qblk:
        for n0 in tl.range(0, qblk * BLK, TILE, warp_specialize=WS):
            if USE_TMA:
                k = desc_k.load([kv_row0 + n0, 0])
                v = desc_v.load([kv_row0 + n0, 0])
            else:
                k = tl.load(kbase + (n0 + offs_n)[:, None] * s_kn + offs_d[None, :])
                v = tl.load(vbase + (n0 + offs_n)[:, None] * s_vn + offs_d[None, :])
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, 0.0, None, False)
    else:
        for t in tl.range(0, cnt * SUB, warp_specialize=WS):
            kb = tl.load(lut + t // SUB)
            n0 = kb * BLK + (t % SUB) * TILE
            if USE_TMA:
                k = desc_k.load([kv_row0 + n0, 0])
                v = desc_v.load([kv_row0 + n0, 0])
            else:
                k = tl.load(kbase + (n0 + offs_n)[:, None] * s_kn + offs_d[None, :])
                v = tl.load(vbase + (n0 + offs_n)[:, None] * s_vn + offs_d[None, :])
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, 0.0, None, False)
    return acc, m_i, l_i


@triton.jit
def _level_blocks(acc, m_i, l_i, q, lut, cnt, kbase, vbase, s_kn, s_vn, offs_d, qk_scale,
                  P: tl.constexpr, TILE: tl.constexpr, LOG2R: tl.constexpr):
    """All listed key blocks of one level: ``cnt`` blocks of P (pooled) keys, no causal mask."""
    if P >= TILE:
        SUB: tl.constexpr = P // TILE
        offs_n = tl.arange(0, TILE)
        for t in range(0, cnt * SUB):
            kb = tl.load(lut + t // SUB)
            n0 = kb * P + (t % SUB) * TILE
            k = tl.load(kbase + (n0 + offs_n)[:, None] * s_kn + offs_d[None, :])
            v = tl.load(vbase + (n0 + offs_n)[:, None] * s_vn + offs_d[None, :])
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, LOG2R, None, False)
    else:
        # several blocks per tile, gathered through the LUT; the last tile may be partial
        BPT: tl.constexpr = TILE // P
        offs_n = tl.arange(0, TILE)
        within = offs_n % P
        slot = offs_n // P
        for t in range(0, tl.cdiv(cnt, BPT)):
            bi = t * BPT + slot
            valid = bi < cnt
            kb = tl.load(lut + bi, mask=valid, other=0)
            rows = kb * P + within
            k = tl.load(kbase + rows[:, None] * s_kn + offs_d[None, :])
            v = tl.load(vbase + rows[:, None] * s_vn + offs_d[None, :])
            acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, LOG2R, valid[None, :], True)
    return acc, m_i, l_i


@triton.jit
def _diag_block(acc, m_i, l_i, q, kbase, vbase, s_kn, s_vn, offs_d, offs_m, q_hi, qblk, Lk,
                qk_scale, R: tl.constexpr, P: tl.constexpr, TILE: tl.constexpr,
                LOG2R: tl.constexpr, FROM_INPUT: tl.constexpr):
    """The diagonal key block at level R (P pooled keys) with ``(j+1)*R - 1 <= pos``."""
    offs_n = tl.arange(0, TILE)
    jb = qblk * P
    # pooled keys of the block that the last valid query of the tile can see
    n_vis = tl.minimum(tl.maximum((q_hi + 1) // R - jb, 0), P)
    for s in range(0, tl.cdiv(n_vis, TILE)):
        jloc = s * TILE + offs_n
        jj = jb + jloc
        ok_n = jloc < P
        if FROM_INPUT:
            ok_n = ok_n & (jj < Lk)
        k = tl.load(kbase + jj[:, None] * s_kn + offs_d[None, :], mask=ok_n[:, None], other=0.0)
        v = tl.load(vbase + jj[:, None] * s_vn + offs_d[None, :], mask=ok_n[:, None], other=0.0)
        vis = ((jj[None, :] + 1) * R - 1 <= offs_m[:, None]) & ok_n[None, :]
        acc, m_i, l_i = _softmax_step(acc, m_i, l_i, q, k, v, qk_scale, LOG2R, vis, True)
    return acc, m_i, l_i


@triton.jit
def _attn_kernel(Q, K, V, PK, PV, O, LEV, LUT, CNT, desc_q, desc_k, desc_v,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                 slb, slh, slr,
                 H, G, Lq, Lk, q_offset, qb0, nQB, nKB, NPYR, OFF4, OFF8, n_mtiles,
                 qk_scale,
                 D: tl.constexpr, BLK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 T2: tl.constexpr, T4: tl.constexpr, T8: tl.constexpr,
                 DT1: tl.constexpr, DT2: tl.constexpr, DT4: tl.constexpr, DT8: tl.constexpr,
                 USE_TMA: tl.constexpr = False, WS: tl.constexpr = False):
    mt = n_mtiles - 1 - tl.program_id(0)  # heaviest (latest) query tiles first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    MPB: tl.constexpr = BLK // BLOCK_M
    qrow = mt // MPB
    qblk = qb0 + qrow
    qs = qb0 * BLK + mt * BLOCK_M  # absolute position of the tile's first row
    offs_m = qs + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = (offs_m >= q_offset) & (offs_m < Lk)
    q_hi = tl.minimum(qs + BLOCK_M, Lk) - 1

    if USE_TMA:
        # rows outside [q_offset, Lk) read another head's rows or TMA's zero fill; never stored
        q = desc_q.load([bh * Lq + qs - q_offset, 0])
    else:
        q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + (offs_m - q_offset)[:, None] * sqm + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    kbase = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    vbase = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    pbase = (b * (H // G) + hk).to(tl.int64) * NPYR * D
    pk2 = PK + pbase
    pv2 = PV + pbase
    pk4 = pk2 + OFF4.to(tl.int64) * D
    pv4 = pv2 + OFF4.to(tl.int64) * D
    pk8 = pk2 + OFF8.to(tl.int64) * D
    pv8 = pv2 + OFF8.to(tl.int64) * D

    lrow = bh.to(tl.int64) * nQB + qrow
    lut = LUT + lrow * nKB
    c1 = tl.load(CNT + lrow * 4 + 0)
    c2 = tl.load(CNT + lrow * 4 + 1)
    c4 = tl.load(CNT + lrow * 4 + 2)
    c8 = tl.load(CNT + lrow * 4 + 3)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    acc, m_i, l_i = _level1_blocks(acc, m_i, l_i, q, lut, c1, qblk, kbase, vbase, skn, svn, offs_d, qk_scale,
                                   desc_k, desc_v, (b * (H // G) + hk) * Lk, BLK, BLOCK_N, USE_TMA, WS)
    acc, m_i, l_i = _level_blocks(acc, m_i, l_i, q, lut + c1, c2, pk2, pv2, D, D, offs_d, qk_scale,
                                  BLK // 2, T2, 1.0)
    acc, m_i, l_i = _level_blocks(acc, m_i, l_i, q, lut + c1 + c2, c4, pk4, pv4, D, D, offs_d, qk_scale,
                                  BLK // 4, T4, 2.0)
    acc, m_i, l_i = _level_blocks(acc, m_i, l_i, q, lut + c1 + c2 + c4, c8, pk8, pv8, D, D, offs_d, qk_scale,
                                  BLK // 8, T8, 3.0)

    rd = tl.load(LEV + b.to(tl.int64) * slb + h.to(tl.int64) * slh + qrow.to(tl.int64) * slr + qblk).to(tl.int32)
    if rd == 1:
        acc, m_i, l_i = _diag_block(acc, m_i, l_i, q, kbase, vbase, skn, svn, offs_d, offs_m, q_hi, qblk, Lk,
                                    qk_scale, 1, BLK, DT1, 0.0, True)
    elif rd == 2:
        acc, m_i, l_i = _diag_block(acc, m_i, l_i, q, pk2, pv2, D, D, offs_d, offs_m, q_hi, qblk, Lk,
                                    qk_scale, 2, BLK // 2, DT2, 1.0, False)
    elif rd == 4:
        acc, m_i, l_i = _diag_block(acc, m_i, l_i, q, pk4, pv4, D, D, offs_d, offs_m, q_hi, qblk, Lk,
                                    qk_scale, 4, BLK // 4, DT4, 2.0, False)
    elif rd == 8:
        acc, m_i, l_i = _diag_block(acc, m_i, l_i, q, pk8, pv8, D, D, offs_d, offs_m, q_hi, qblk, Lk,
                                    qk_scale, 8, BLK // 8, DT8, 3.0, False)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + (offs_m - q_offset)[:, None] * som + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])


# ============================================================================================
# host side
# ============================================================================================

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def infer_block_size(Lk: int, q_offset: int, nQB: int, nKB: int) -> int:
    """The block size the levels map was built with, from its shape (config's one rule)."""
    return block_from_levels_shape(Lk, q_offset, nQB, nKB)


def _check_pow2(name, x, lo=16):
    if x < lo or x & (x - 1):
        raise ValueError(f"{name} must be a power of two >= {lo}, got {x}")


def flat_descriptor(t, block_rows, D):
    """A 2-D TMA descriptor over a contiguous ``[B, H, L, D]`` tensor viewed as ``[B*H*L, D]``."""
    B, H, L, _ = (int(s) for s in t.shape)
    return _launch.tensor_descriptor(t, [B * H * L, D], [D, 1], [block_rows, D])


_TMA_BROKEN = None  # set (to the error) when a TMA launch failed in this process
_TMA_OOR: set = set()  # tile settings whose TMA kernel ran out of shared memory


def wants_tma(q, use_tma=None) -> bool:
    """Whether the attention kernel loads through TMA for ``q``: use_tma None means on for compute
    capability 9.x (Hopper) outside the interpreter, unless a TMA launch failed in this process."""
    if _launch.interpreting() or use_tma is False or _TMA_BROKEN is not None:
        return False
    cc = _launch.device_capability(q)
    if use_tma is None:
        return cc is not None and cc[0] == 9
    return cc is None or cc[0] >= 9



def build_pyramid(k, v, block: int):
    """Pooled K/V pyramid: two buffers ``[B, Hkv, Lp/2 + Lp/4 + Lp/8, D]`` and the row offsets."""
    B, Hkv, Lk, D = (int(s) for s in k.shape)
    nKB = -(-Lk // block)
    Lp = nKB * block
    npyr = Lp // 2 + Lp // 4 + Lp // 8
    off4, off8 = Lp // 2, Lp // 2 + Lp // 4
    pk = _launch.empty(k, [B, Hkv, npyr, D])
    pv = _launch.empty(v, [B, Hkv, npyr, D])
    sk, sv = _launch.strides(k), _launch.strides(v)
    _launch.launch(_pyramid_kernel, (nKB, B * Hkv), k, v, pk, pv,
                   sk[0], sk[1], sk[2], sv[0], sv[1], sv[2],
                   Hkv, Lk, npyr, off4, off8,
                   BLK=block, D=D, num_warps=4)
    return pk, pv, npyr, off4, off8


def build_level_lut(levels, q_offset: int, block: int):
    """Per row (b, h, query block) the key blocks below the diagonal grouped by level.

    Returns ``lut int32 [B*Hq*nQB, nKB]`` (first the level-1 blocks, then 2, 4, 8) and
    ``counts int32 [B*Hq*nQB, 4]``.
    """
    B, H, nQB, nKB = (int(s) for s in levels.shape)
    rows = B * H * nQB
    lut = _launch.empty(levels, [rows, nKB], "int32")
    cnt = _launch.empty(levels, [rows, 4], "int32")
    sl = _launch.strides(levels)
    if sl[3] != 1:
        raise ValueError("levels must be contiguous in its last dimension")
    _launch.launch(_lut_kernel, (rows,), levels, lut, cnt, sl[0], sl[1], sl[2], H, q_offset // block, nQB, nKB,
                   NP=max(16, _pow2_at_least(nKB)), num_warps=4)
    return lut, cnt


def pyramid_attention_triton(q, k, v, levels, q_offset, scale, *, block_size: int | None = None,
                             tiles: tuple | None = None, out=None, use_tma: bool | None = None,
                             _levels_all_one: bool = False):
    """PSA step 5: ``out [B, Hq, Lq, D]`` (dtype of q), causal, levels per block pair.

    ``block_size`` defaults to the one ``levels``' shape implies (see :func:`infer_block_size`).
    ``tiles = (BLOCK_M, BLOCK_N, BLOCK_NP, num_warps, num_stages)`` overrides the defaults.
    A 6th element of ``tiles`` picks the kernel variant: ``"plain"``, ``"tma"`` or ``"tma_ws"``
    (TMA plus Triton's warp specialisation of the level-1 loop); a 7th, ``gather``, makes every
    pooled level run in tiles of BLOCK_NP keys, gathering several blocks of levels 4 and 8 per tile.
    ``out``: optional preallocated ``[B, Hq, Lq, D]`` tensor of q's dtype to write into.
    ``use_tma``: None (default) = TMA tensor descriptors on Hopper (compute capability 9.x) when
    q, k, v are contiguous; False = never; True = whenever the inputs allow it.
    """
    global _TMA_BROKEN
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or levels.ndim != 4:
        raise ValueError("q, k, v, levels must be 4-D")
    B, Hq, Lq, D = (int(s) for s in q.shape)
    Bk, Hkv, Lk, Dk = (int(s) for s in k.shape)
    if tuple(int(s) for s in v.shape) != (Bk, Hkv, Lk, Dk) or Bk != B or Dk != D:
        raise ValueError(f"shape mismatch: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    q_offset = int(q_offset)
    if not (0 <= q_offset and q_offset + Lq == Lk):
        raise ValueError(f"need q_offset = Lk - Lq >= 0, got q_offset={q_offset}, Lq={Lq}, Lk={Lk}")
    if Lq == 0:
        return _launch.empty(q, [B, Hq, 0, D])
    _check_pow2("head_dim", D)
    dt = _launch.dtype_name(q)
    if dt != _launch.dtype_name(k) or dt != _launch.dtype_name(v):
        raise ValueError("q, k, v must share one dtype")
    allowed = ("float16", "bfloat16", "float32") if _launch.interpreting() else ("float16", "bfloat16")
    if dt not in allowed:
        raise ValueError(f"dtype {dt} not supported (use one of {allowed})")
    if _launch.dtype_name(levels) != "int8":
        raise ValueError("levels must be int8")
    nQB, nKB = int(levels.shape[2]), int(levels.shape[3])
    if tuple(int(s) for s in levels.shape[:2]) != (B, Hq):
        raise ValueError(f"levels batch/heads {list(levels.shape[:2])} != {[B, Hq]}")
    blk = int(block_size) if block_size is not None else infer_block_size(Lk, q_offset, nQB, nKB)
    _check_pow2("block size", blk, 16)
    if -(-Lk // blk) != nKB or nKB - q_offset // blk != nQB:
        raise ValueError(f"levels shape (nQB={nQB}, nKB={nKB}) does not match Lk={Lk}, q_offset={q_offset}, "
                         f"block={blk}")

    q = _launch.ensure_last_dim_contiguous(q)
    k = _launch.ensure_last_dim_contiguous(k)
    v = _launch.ensure_last_dim_contiguous(v)
    if _launch.strides(levels)[3] != 1:
        levels = levels.contiguous()

    variant, gather = None, False
    if tiles is not None and len(tiles) > 5:
        variant = tiles[5]
        gather = len(tiles) > 6 and bool(tiles[6])
        if variant not in _VARIANTS:
            raise ValueError(f"kernel variant {variant!r} not in {_VARIANTS}")
        tiles = tuple(tiles[:5])
        if variant != "plain" and use_tma is None:
            use_tma = True
    tma = (variant != "plain") and wants_tma(q, use_tma) and _launch.tma_ready(q, k, v)
    ws = tma and (variant == "tma_ws" or (variant is None and HOPPER_WARP_SPECIALIZE))
    if tiles is None:
        tiles = _tiles.attention_tiles(q, tma=tma)  # per GPU class (psa_paddle/tiles.py)
    bm, bn, bnp, warps, stages = tiles
    bm, bn = min(bm, blk), min(bn, blk)
    bnp = max(16, bnp)

    def pooled_tile(p):  # tile over pooled keys of one level (gathers blocks when p < tile)
        if gather:  # always BLOCK_NP keys: levels with fewer keys per block gather several blocks
            return bnp
        return min(bnp, p) if p >= 16 else 16

    t2, t4, t8 = pooled_tile(blk // 2), pooled_tile(blk // 4), pooled_tile(blk // 8)
    dt1 = bn
    dt2, dt4, dt8 = (max(16, min(bnp, blk // r)) for r in (2, 4, 8))

    if _levels_all_one:  # dense: no pooled level is ever read, skip building the pyramid
        pk, pv, npyr, off4, off8 = k, v, 0, 0, 0
    else:
        pk, pv, npyr, off4, off8 = build_pyramid(k, v, blk)
    lut, cnt = build_level_lut(levels, q_offset, blk)
    if out is None:
        out = _launch.empty(q, [B, Hq, Lq, D])
    elif (tuple(int(x) for x in out.shape) != (B, Hq, Lq, D) or _launch.dtype_name(out) != dt
          or _launch.strides(out)[3] != 1):
        raise ValueError("out must be [B, Hq, Lq, D] with q's dtype and a contiguous last dimension")

    qb0 = q_offset // blk
    n_mtiles = nQB * (blk // bm)
    sq, sk, sv, so, sl = (_launch.strides(t) for t in (q, k, v, out, levels))

    def _go(tma_now):
        if tma_now:
            dq, dk, dv = flat_descriptor(q, bm, D), flat_descriptor(k, bn, D), flat_descriptor(v, bn, D)
        else:
            dq = dk = dv = None
        _launch.launch(_attn_kernel, (n_mtiles, B * Hq), q, k, v, pk, pv, out, levels, lut, cnt, dq, dk, dv,
                       sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], so[0], so[1], so[2],
                       sl[0], sl[1], sl[2],
                       Hq, Hq // Hkv, Lq, Lk, q_offset, qb0, nQB, nKB, npyr, off4, off8, n_mtiles,
                       float(scale) * _LOG2E,
                       D=D, BLK=blk, BLOCK_M=bm, BLOCK_N=bn, T2=t2, T4=t4, T8=t8,
                       DT1=dt1, DT2=dt2, DT4=dt4, DT8=dt8, USE_TMA=tma_now, WS=ws and tma_now,
                       num_warps=warps, num_stages=stages)

    oor_key = (bm, bn, bnp, warps, stages, gather, D, blk, dt)
    if tma and variant is None and oor_key in _TMA_OOR:
        tma = False  # these tiles did not fit with TMA before: straight to the plain kernel
    if tma and variant is None:
        try:
            _go(True)
        except Exception as ex:  # a Triton without working descriptors here: the plain kernel, from now on
            err = f"{type(ex).__name__}: {str(ex)[:300]}"
            if type(ex).__name__ == "OutOfResources":  # these tiles only (e.g. tiles made for the plain path)
                _TMA_OOR.add(oor_key)
            else:
                _TMA_BROKEN = err
            _go(False)
            # after the plain kernel ran: if it fails too, psa.py's one warning says so, not two
            warnings.warn(f"PSA: the TMA attention kernel failed ({err}); using the plain kernel", stacklevel=2)
    else:
        _go(tma)  # an explicitly requested variant fails loudly
    return out


def dense_attention_triton(q, k, v, q_offset, scale, *, block_size: int = 128, tiles: tuple | None = None,
                           use_tma: bool | None = None):
    """Dense causal attention through the same kernel: every block at level 1.

    Usable as the short-sequence fallback (no estimate, no pooled levels are read).
    """
    B, Hq, Lq, _ = (int(s) for s in q.shape)
    Lk = int(k.shape[2])
    nKB = -(-Lk // block_size)
    nQB = nKB - int(q_offset) // block_size
    levels = _launch.full(q, [B, Hq, nQB, nKB], 1, "int8")
    if tiles is None and not _launch.interpreting():
        tma = wants_tma(q, use_tma) and _launch.tma_ready(q, k, v)
        tiles = _tiles.attention_tiles(q, dense=True, tma=tma)  # per GPU class (psa_paddle/tiles.py)
    return pyramid_attention_triton(q, k, v, levels, q_offset, scale, block_size=block_size, tiles=tiles,
                                    use_tma=use_tma, _levels_all_one=True)
