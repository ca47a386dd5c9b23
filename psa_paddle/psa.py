"""psa_attention: the PSA pipeline, backend choice, padding masks, dense fallback, stats."""
from __future__ import annotations

import functools
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import paddle

from .attention import dense_causal_attention, pyramid_attention_paddle
from .config import AttentionConfig
from .estimate import block_importance
from .mask import compute_levels

HIST_LEVELS = (0, 1, 2, 4, 8)


# ----------------------------------------------------------------------------- stats

@dataclass
class PSACall:
    """What one psa_attention call did (a padded batch counts as one call)."""
    layer_idx: int | None
    seq_len: int  # Lk
    q_len: int  # Lq
    backend: str  # "dense", "paddle" or "triton" (attention); estimate noted separately
    estimate: str  # "paddle", "triton" or "" (dense)
    hist: dict  # level -> count over causal block pairs (all batch rows and heads)
    t_estimate: float = 0.0  # seconds, device-synchronised
    t_mask: float = 0.0
    t_attention: float = 0.0

    @property
    def sparsity(self) -> float:
        return sparsity_from_hist(self.hist)


@dataclass
class PSAStats:
    """Pass one to psa_attention(stats=...) to collect per-call records."""
    calls: list = field(default_factory=list)

    def add(self, call: PSACall):
        self.calls.append(call)

    def reset(self):
        self.calls.clear()

    def histogram(self, include_dense: bool = False) -> dict:
        tot = dict.fromkeys(HIST_LEVELS, 0)
        for c in self.calls:
            if include_dense or c.backend != "dense":
                for lv, n in c.hist.items():
                    tot[lv] += n
        return tot

    def sparsity(self) -> float:
        """FLOP-equivalent sparsity over all causal block pairs of all PSA (non-dense) calls."""
        return sparsity_from_hist(self.histogram())

    def by_layer(self) -> dict:
        """layer_idx -> sparsity over that layer's PSA calls."""
        out = {}
        for c in self.calls:
            if c.backend != "dense":
                h = out.setdefault(c.layer_idx, dict.fromkeys(HIST_LEVELS, 0))
                for lv, n in c.hist.items():
                    h[lv] += n
        return {k: sparsity_from_hist(h) for k, h in out.items()}

    def summary(self) -> dict:
        psa = [c for c in self.calls if c.backend != "dense"]
        return {
            "calls": len(self.calls),
            "psa_calls": len(psa),
            "dense_calls": len(self.calls) - len(psa),
            "sparsity": self.sparsity(),
            "histogram": self.histogram(),
            "t_estimate": sum(c.t_estimate for c in self.calls),
            "t_mask": sum(c.t_mask for c in self.calls),
            "t_attention": sum(c.t_attention for c in self.calls),
        }


def sparsity_from_hist(hist: dict) -> float:
    """1 - mean(1/level) over the counted pairs, 1/0 = 0. 0.0 when nothing was counted."""
    n = sum(hist.values())
    if n == 0:
        return 0.0
    kept = sum(cnt / lv for lv, cnt in hist.items() if lv)
    return 1.0 - kept / n


def level_histogram(levels: paddle.Tensor, q_offset: int, BLK: int, Lk: int) -> dict:
    """levels [B, H, nQB, nKB] -> {level: count} over causal pairs (kb <= qb0 + row)."""
    nQB, nKB = levels.shape[-2:]
    qb0 = q_offset // BLK
    if nKB != -(-Lk // BLK) or nQB != nKB - qb0:
        raise ValueError(f"levels shape {levels.shape} does not fit Lk={Lk}, q_offset={q_offset}, BLK={BLK}")
    causal = np.arange(nKB)[None, :] <= (qb0 + np.arange(nQB))[:, None]
    causal = paddle.to_tensor(causal, place=levels.place)
    lv = levels.astype("int32")
    return {r: int(((lv == r) & causal).astype("int64").sum()) for r in HIST_LEVELS}


def flop_sparsity(levels: paddle.Tensor, q_offset: int, BLK: int, Lk: int) -> float:
    """FLOP-equivalent sparsity: 1 - mean(1/level) over causal block pairs, 1/0 counted as 0."""
    return sparsity_from_hist(level_histogram(levels, q_offset, BLK, Lk))


class _Clock:
    """Device-synchronised lap timer; a no-op unless stats were requested."""

    def __init__(self, on: bool, place):
        self.on = on
        self.gpu = on and not place.is_cpu_place()
        self.t = time.perf_counter() if on else 0.0

    def lap(self) -> float:
        if not self.on:
            return 0.0
        if self.gpu:
            paddle.device.synchronize()
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


# ----------------------------------------------------------------------------- backends

@functools.lru_cache(maxsize=None)
def _import_triton(name: str):
    """Lazily import a Triton module of this package; None (and one warning) if it fails."""
    try:
        if name == "attention":
            from .triton_attention import pyramid_attention_triton as fn
        elif name == "dense":
            from .triton_attention import dense_attention_triton as fn
        else:
            from .triton_estimate import estimate_levels_triton as fn
        return fn
    except Exception as e:  # ImportError, or Triton failing to initialise its driver
        warnings.warn(f"PSA: Triton {name} unavailable ({type(e).__name__}: {e}); using plain Paddle.")
        return None


def _wants_triton(cfg: AttentionConfig, place) -> bool:
    if cfg.backend == "paddle":
        return False
    if place.is_gpu_place():
        return True
    # explicit "triton" off-GPU only makes sense under the Triton CPU interpreter (tests)
    if cfg.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if cfg.backend == "triton":
        raise RuntimeError(
            "backend='triton' needs a GPU tensor (or TRITON_INTERPRET=1 for CPU testing); "
            "use backend='auto' or 'paddle' on this device."
        )
    return False


def _backends(cfg: AttentionConfig, place):
    """-> (estimate_fn or None for plain, attention_fn, attention backend name)."""
    if not _wants_triton(cfg, place):
        return None, pyramid_attention_paddle, "paddle"
    est = _import_triton("estimate")
    attn = _import_triton("attention")
    if attn is None:
        if cfg.backend == "triton":
            raise RuntimeError("backend='triton' but psa_paddle.triton_attention failed to import (see warning).")
        return est, pyramid_attention_paddle, "paddle"
    return est, attn, "triton"


def _try_triton(cfg, what, fn, *args):
    """Run a Triton step; under backend='auto' a shape it does not support (ValueError, e.g. a
    head_dim that is not a power of two) falls back to plain Paddle instead of failing."""
    try:
        return fn(*args)
    except ValueError as e:
        if cfg.backend != "auto":
            raise
        warnings.warn(f"PSA: Triton {what} cannot take this input ({e}); using plain Paddle.")
        return None


# ----------------------------------------------------------------------------- pipeline

def _check_inputs(q, k, v, q_offset, key_mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {q.shape}, {k.shape}, {v.shape}")
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, Hkv, Lk, D={D}] alike; got {k.shape}, {v.shape}")
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if Lq > Lk:
        raise ValueError(f"query length {Lq} exceeds key length {Lk}")
    q_offset = Lk - Lq if q_offset is None else int(q_offset)
    if not 0 <= q_offset <= Lk - Lq:
        raise ValueError(f"q_offset must be in [0, Lk - Lq] = [0, {Lk - Lq}], got {q_offset}")
    if key_mask is not None and (key_mask.ndim != 2 or key_mask.shape != [B, Lk]):
        raise ValueError(f"key_mask must be [B={B}, Lk={Lk}] bool, got {key_mask.shape}")
    return q_offset


def psa_attention(q, k, v, cfg: AttentionConfig, *, q_offset: int | None = None, key_mask=None,
                  scale: float | None = None, stats: PSAStats | None = None,
                  layer_idx: int | None = None) -> paddle.Tensor:
    """Causal pyramid sparse attention. q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D].

    Query i sits at absolute position q_offset + i (default Lk - Lq). Keys after the last query
    are invisible to every query and are dropped. key_mask [B, Lk] bool marks real tokens of a
    padded batch: each row runs on its real tokens only; padded query rows come back as zeros.
    """
    q_offset = _check_inputs(q, k, v, q_offset, key_mask)
    B, Hq, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    end = q_offset + Lq
    if end < k.shape[2]:
        k, v = k[:, :, :end], v[:, :, :end]
        key_mask = None if key_mask is None else key_mask[:, :end]
    call = PSACall(layer_idx, k.shape[2], Lq, "", "", dict.fromkeys(HIST_LEVELS, 0))
    if key_mask is not None and not bool(key_mask.astype("bool").all()):
        out = _psa_padded(q, k, v, cfg, key_mask.astype("bool"), scale, call, stats is not None)
    else:
        out = _psa_one(q, k, v, cfg, q_offset, scale, call, stats is not None)
    if stats is not None:
        stats.add(call)
    return out


def _psa_padded(q, k, v, cfg, key_mask, scale, call, timed):
    """Per batch row: gather its real tokens, run PSA compactly, scatter back (zeros elsewhere)."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    outs = []
    for b in range(B):
        km = key_mask[b]  # [Lk]
        qm = km[Lk - Lq :]  # [Lq]: query i is key position Lk - Lq + i
        kidx = paddle.nonzero(km).reshape([-1])
        qidx = paddle.nonzero(qm).reshape([-1])
        nq, nk = int(qidx.shape[0]), int(kidx.shape[0])
        if nq == 0:
            outs.append(paddle.zeros([1, Hq, Lq, D], q.dtype))
            continue
        qb = paddle.gather(q[b : b + 1], qidx, axis=2)
        kb = paddle.gather(k[b : b + 1], kidx, axis=2)
        vb = paddle.gather(v[b : b + 1], kidx, axis=2)
        ob = _psa_one(qb, kb, vb, cfg, nk - nq, scale, call, timed)  # [1, Hq, nq, D]
        # scatter by gathering from [ob, zero row]: padded query i reads the zero row
        ob = paddle.concat([ob, paddle.zeros([1, Hq, 1, D], ob.dtype)], axis=2)
        inv = paddle.where(qm, paddle.cumsum(qm.astype("int64")) - 1, paddle.full([Lq], nq, "int64"))
        outs.append(paddle.gather(ob, inv, axis=2))
    return paddle.concat(outs, axis=0)


def _dense(q, k, v, cfg, q_offset, scale):
    """Below min_seq_len: the dense Triton kernel where PSA would use Triton (0.7x FA2 on an
    H200, bench/RESULTS.md), else plain Paddle."""
    if q.shape[2] > 0 and _wants_triton(cfg, q.place):
        fn = _import_triton("dense")
        out = fn and _try_triton(cfg, "dense attention", fn, q, k, v, q_offset, scale)
        if out is not None:
            return out
    return dense_causal_attention(q, k, v, q_offset, scale)


def _psa_one(q, k, v, cfg, q_offset, scale, call, timed):
    """Unpadded PSA (or dense below min_seq_len); adds this run's numbers to `call`."""
    Lq, Lk = q.shape[2], k.shape[2]
    clock = _Clock(timed, q.place)
    if Lq == 0 or Lk < cfg.min_seq_len:
        out = _dense(q, k, v, cfg, q_offset, scale)
        call.backend = call.backend or "dense"
        call.t_attention += clock.lap()
        return out
    est_fn, attn_fn, name = _backends(cfg, q.place)
    fused = est_fn and _try_triton(cfg, "estimate", est_fn, q, k, cfg, q_offset)  # steps 1-4
    if fused:
        levels = fused[0]
        call.t_estimate += clock.lap()
    else:
        est_fn = None
        imp = block_importance(q, k, cfg, q_offset)
        call.t_estimate += clock.lap()
        levels = compute_levels(imp, k, cfg, q_offset)
        call.t_mask += clock.lap()
    out = None
    if attn_fn is not pyramid_attention_paddle:
        out = _try_triton(cfg, "attention", attn_fn, q, k, v, levels, q_offset, scale)
    if out is None:
        out = pyramid_attention_paddle(q, k, v, levels, q_offset, scale, block=cfg.query_block)
        name = "paddle"
    call.t_attention += clock.lap()
    # a padded batch can mix dense (short) and PSA rows: PSA wins the label
    call.backend = name
    call.estimate = "triton" if est_fn is not None else "paddle"
    if timed:
        for lv, n in level_histogram(levels, q_offset, cfg.query_block, Lk).items():
            call.hist[lv] += n
    return out
