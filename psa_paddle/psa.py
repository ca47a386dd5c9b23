"""psa_attention: the PSA pipeline, backend choice and fail-over, padding masks, stats.

Backends. On a GPU the Triton kernels (psa_paddle/triton_*.py) run steps 1-5. Any failure of
that path that is not about one input (no CUDA driver, no C compiler, a compile error, too
little shared memory, a failed launch, Triton missing) prints ONE warning naming the cause and
what to do; Triton then stays off for the rest of the process and the GPU runs dense attention
(Paddle's scaled_dot_product_attention, i.e. flash attention: the plain-Paddle PSA computes in
float32 with gathers and is far slower than that on a GPU). On a CPU PSA runs in plain Paddle.
``backend="triton"`` never falls back: it raises :class:`TritonBackendError` instead.

Stats. Nothing in a prefill waits for the GPU: the per-phase times are CUDA events and the
level histograms stay on the device; :meth:`PSAStats.finalize` (called by ``summary()`` and
the other readers) reads them once, after the prefill.
"""
from __future__ import annotations

import functools
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import paddle

from .attention import dense_causal_attention, pyramid_attention_paddle
from .config import AttentionConfig
from .estimate import block_importance
from .mask import compute_levels

HIST_LEVELS = (0, 1, 2, 4, 8)
TRITON_PIN = "triton>=3.5,<3.10"


# ----------------------------------------------------------------------------- stats

class PSACall:
    """What one psa_attention call did (a padded batch counts as one call).

    ``hist`` (level -> count over causal block pairs, all batch rows and heads) and the phase
    times ``t_estimate`` / ``t_mask`` / ``t_attention`` (seconds: CUDA-event time on a GPU,
    host time on a CPU) are gathered on the device during the call and brought to the host
    the first time one of them is read (:meth:`finalize`): no host synchronisation inside the
    prefill, one after it.
    """

    def __init__(self, layer_idx, seq_len, q_len, backend="", estimate="", hist=None):
        self.layer_idx = layer_idx
        self.seq_len = seq_len  # Lk
        self.q_len = q_len  # Lq
        self.backend = backend  # "dense", "paddle" or "triton" (attention)
        self.estimate = estimate  # "paddle", "triton" or "" (dense)
        self._hist = dict(hist) if hist else dict.fromkeys(HIST_LEVELS, 0)
        self._t = {"t_estimate": 0.0, "t_mask": 0.0, "t_attention": 0.0}
        self._hist_dev = None  # int64 [5] on the device, pending
        self._laps = []  # (phase, start event, end event), pending

    def __repr__(self):
        return (f"PSACall(layer_idx={self.layer_idx}, seq_len={self.seq_len}, q_len={self.q_len}, "
                f"backend={self.backend!r}, estimate={self.estimate!r}, hist={self.hist})")

    def _add_time(self, phase: str, seconds: float):
        self._t[phase] += seconds

    def finalize(self):
        """Read the device-side counts and events (waits for them, once)."""
        if self._hist_dev is not None:
            counts = self._hist_dev.numpy()
            for lv, n in zip(HIST_LEVELS, counts):
                self._hist[lv] += int(n)
            self._hist_dev = None
        for phase, e0, e1 in self._laps:
            self._t[phase] += e0.elapsed_time(e1) / 1000.0
        self._laps = []
        return self

    @property
    def hist(self) -> dict:
        return self.finalize()._hist

    @property
    def t_estimate(self) -> float:
        return self.finalize()._t["t_estimate"]

    @property
    def t_mask(self) -> float:
        return self.finalize()._t["t_mask"]

    @property
    def t_attention(self) -> float:
        return self.finalize()._t["t_attention"]

    @property
    def sparsity(self) -> float:
        return sparsity_from_hist(self.hist)


@dataclass
class PSAStats:
    """Pass one to psa_attention(stats=...) to collect per-call records. Every reader below
    calls :meth:`finalize` first, so read them after the prefill, not inside it."""
    calls: list = field(default_factory=list)

    def add(self, call: PSACall):
        self.calls.append(call)

    def reset(self):
        self.calls.clear()

    def finalize(self) -> PSAStats:
        """Bring every pending device-side number to the host (one wait for the GPU)."""
        for c in self.calls:
            c.finalize()
        return self

    def histogram(self, include_dense: bool = False) -> dict:
        self.finalize()
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
        self.finalize()
        out = {}
        for c in self.calls:
            if c.backend != "dense":
                h = out.setdefault(c.layer_idx, dict.fromkeys(HIST_LEVELS, 0))
                for lv, n in c.hist.items():
                    h[lv] += n
        return {k: sparsity_from_hist(h) for k, h in out.items()}

    def summary(self) -> dict:
        self.finalize()
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


def level_histogram_device(levels: paddle.Tensor, q_offset: int, BLK: int, Lk: int) -> paddle.Tensor:
    """levels [B, H, nQB, nKB] -> int64 [5] on levels' device: counts of HIST_LEVELS over causal
    pairs (kb <= qb0 + row). Device ops only: no host copy, no synchronisation."""
    nQB, nKB = levels.shape[-2:]
    qb0 = q_offset // BLK
    if nKB != -(-Lk // BLK) or nQB != nKB - qb0:
        raise ValueError(f"levels shape {levels.shape} does not fit Lk={Lk}, q_offset={q_offset}, BLK={BLK}")
    causal = paddle.arange(nKB).reshape([1, nKB]) <= (paddle.arange(nQB) + qb0).reshape([nQB, 1])
    # pairs above the diagonal count as level -1, which no bucket matches
    lv = paddle.where(causal, levels.astype("int32"), paddle.full_like(levels, -1, "int32"))
    return paddle.stack([(lv == r).astype("int64").sum() for r in HIST_LEVELS])


def level_histogram(levels: paddle.Tensor, q_offset: int, BLK: int, Lk: int) -> dict:
    """levels [B, H, nQB, nKB] -> {level: count} over causal pairs (kb <= qb0 + row)."""
    counts = level_histogram_device(levels, q_offset, BLK, Lk).numpy()
    return {r: int(n) for r, n in zip(HIST_LEVELS, counts)}


def flop_sparsity(levels: paddle.Tensor, q_offset: int, BLK: int, Lk: int) -> float:
    """FLOP-equivalent sparsity: 1 - mean(1/level) over causal block pairs, 1/0 counted as 0."""
    return sparsity_from_hist(level_histogram(levels, q_offset, BLK, Lk))


class _Clock:
    """Lap timer for one call's phases, a no-op unless stats were requested. On a GPU each lap
    records a CUDA event (no wait); on a CPU, where Paddle runs synchronously, the host clock."""

    def __init__(self, on: bool, place, call: PSACall):
        self.on = on
        self.call = call
        self.gpu = on and place.is_gpu_place()
        self.t = time.perf_counter() if on else 0.0
        self.ev = self._event() if self.gpu else None

    @staticmethod
    def _event():
        e = paddle.device.Event(enable_timing=True)
        e.record()
        return e

    def lap(self, phase: str):
        if not self.on:
            return
        if self.gpu:
            ev = self._event()
            self.call._laps.append((phase, self.ev, ev))
            self.ev = ev
            return
        now = time.perf_counter()
        self.call._add_time(phase, now - self.t)
        self.t = now


# ----------------------------------------------------------------------------- backends

class TritonBackendError(ValueError):
    """backend="triton" was asked for and the Triton path cannot run (the cause is attached)."""


_TRITON_OFF: str | None = None  # why Triton is off for the rest of this process


def triton_off_reason() -> str | None:
    """None while the Triton path may run; else the one-line reason it was switched off."""
    return _TRITON_OFF


def reset_triton_state():
    """Forget an earlier Triton failure (tests; or after fixing the cause in a live process)."""
    global _TRITON_OFF
    _TRITON_OFF = None
    getattr(_import_triton, "cache_clear", lambda: None)()


def explain_triton_failure(e: BaseException) -> str:
    """'cause; what to do' in one line, for each way the Triton path is known to fail."""
    name = type(e).__name__
    msg = " ".join(str(e).split())[:300]
    low = msg.lower()
    if isinstance(e, ImportError):
        return f"Triton is not importable ({name}: {msg}); install it with pip install '{TRITON_PIN}'"
    if name == "UnsupportedGPU":
        return f"{msg}"
    if name == "OutOfResources":
        return (f"a PSA kernel needs more GPU resources than this GPU offers ({msg}); please report the GPU "
                "model and `nvidia-smi` output, and set TRITON_CACHE_DIR to a fresh folder if tiles were edited")
    if "c compiler" in low or "gcc" in low or name == "CalledProcessError" or "cc environment" in low:
        return (f"Triton needs a C compiler to build its launcher ({name}: {msg}); install gcc "
                "(e.g. apt-get install build-essential) or point CC at one")
    if "libcuda" in low or "active driver" in low or "cuda driver" in low or "no cuda gpus" in low:
        return (f"Triton found no usable CUDA driver ({name}: {msg}); check that `nvidia-smi` works, or set "
                "TRITON_LIBCUDA_PATH to the folder holding libcuda.so")
    if name in ("CompilationError", "CompileTimeAssertionFailure") or "passmanager" in low \
            or type(e).__module__.startswith("triton.compiler"):
        import importlib.metadata as md
        try:
            ver = md.version("triton")
        except Exception:
            ver = "?"
        return (f"Triton {ver} could not compile the PSA kernels ({name}: {msg}); use a tested Triton: "
                f"pip install '{TRITON_PIN}'")
    return f"the PSA Triton path failed ({name}: {msg}); please report it with the GPU model and Triton version"


def _switch_triton_off(e: BaseException, fallback: str):
    global _TRITON_OFF
    if _TRITON_OFF is None:
        _TRITON_OFF = explain_triton_failure(e)
        warnings.warn(f"PSA: Triton is off for this process: {_TRITON_OFF}. Using {fallback} instead.",
                      stacklevel=4)


@functools.cache
def _import_triton(name: str):
    """A Triton function of this package, imported at first use (raises what the import raises)."""
    if name == "attention":
        from .triton_attention import pyramid_attention_triton as fn
    elif name == "dense":
        from .triton_attention import dense_attention_triton as fn
    else:
        from .triton_estimate import estimate_levels_triton as fn
    return fn


def _on_gpu(place) -> bool:
    return bool(place.is_gpu_place())


def _wants_triton(cfg: AttentionConfig, place) -> bool:
    """Should this call try the Triton path? Raises TritonBackendError for a forced backend
    that cannot run here."""
    if cfg.backend == "paddle":
        return False
    if _on_gpu(place):
        if _TRITON_OFF is not None:
            if cfg.backend == "triton":
                raise TritonBackendError(f"backend='triton' cannot run: {_TRITON_OFF}")
            return False
        return True
    # explicit "triton" off-GPU only makes sense under the Triton CPU interpreter (tests)
    if cfg.backend == "triton":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True
        raise TritonBackendError(
            "backend='triton' needs a GPU tensor (or TRITON_INTERPRET=1 for CPU testing); "
            "use backend='auto' or 'paddle' on this device.")
    return False


def _run_triton(cfg, what: str, fn, *args, **kwargs):
    """Run one step of the Triton path. Returns None when the caller must fall back:

    * ValueError: this input is one the kernels do not take (e.g. a head size that is not a
      power of two): a warning, a fallback for this call, Triton stays on;
    * anything else (driver, compiler, resources, launch, import): one warning for the process,
      Triton off from now on.
    backend="triton" raises TritonBackendError instead of falling back.
    """
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        if isinstance(e, TritonBackendError):
            raise
        if cfg.backend == "triton":
            raise TritonBackendError(f"backend='triton' cannot take this input: {e}") from e
        warnings.warn(f"PSA: Triton {what} cannot take this input ({e}); falling back for this call.",
                      stacklevel=3)
        return None
    except Exception as e:  # noqa: BLE001 - every other failure of the Triton path is handled alike
        if cfg.backend == "triton":
            raise TritonBackendError(f"backend='triton' failed: {explain_triton_failure(e)}") from e
        _switch_triton_off(e, "dense attention (the model's own kernel)" if _on_gpu(args[0].place)
                           else "the plain-Paddle PSA")
        return None


def dense_sdpa(q, k, v, q_offset: int, scale: float):
    """Dense causal attention through Paddle's scaled_dot_product_attention (flash attention on a
    GPU): the GPU fallback. q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D]."""
    import paddle.nn.functional as F

    Lq, Lk = q.shape[2], k.shape[2]
    qt, kt, vt = (x.transpose([0, 2, 1, 3]) for x in (q, k, v))  # sdpa takes [B, L, H, D]
    if Lq == Lk and q_offset == 0:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, training=False, scale=scale,
                                             enable_gqa=True)
    else:
        qpos = paddle.arange(q_offset, q_offset + Lq).reshape([Lq, 1])
        allowed = paddle.arange(Lk).reshape([1, Lk]) <= qpos
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, is_causal=False, training=False,
                                             scale=scale, enable_gqa=True)
    return out.transpose([0, 2, 1, 3])


# ----------------------------------------------------------------------------- pipeline

def validate_inputs(q, k, v, cfg, q_offset, key_mask) -> int:
    """The one input check of PSA (every backend relies on it): shapes, heads, offsets, mask,
    config type. Returns the resolved q_offset."""
    if not isinstance(cfg, AttentionConfig):
        raise TypeError(f"cfg must be a psa_paddle.AttentionConfig, got {type(cfg).__name__}")
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
    q_offset = validate_inputs(q, k, v, cfg, q_offset, key_mask)
    B, Hq, Lq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    end = q_offset + Lq
    if end < k.shape[2]:
        k, v = k[:, :, :end], v[:, :, :end]
        key_mask = None if key_mask is None else key_mask[:, :end]
    call = PSACall(layer_idx, k.shape[2], Lq)
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


def _triton_fn(name: str):
    """fn(*args) that imports the Triton function at first use: an import failure is a Triton
    failure like any other (handled by _run_triton)."""
    return lambda *args, **kwargs: _import_triton(name)(*args, **kwargs)


def _dense(q, k, v, cfg, q_offset, scale):
    """Below min_seq_len (or after a fallback): the dense Triton kernel where PSA would use Triton
    (0.7x FA2 on an H200, bench/RESULTS.md); Paddle's flash attention on a GPU once Triton is
    off; plain Paddle elsewhere."""
    if q.shape[2] > 0 and _wants_triton(cfg, q.place):
        out = _run_triton(cfg, "dense attention", _triton_fn("dense"), q, k, v, q_offset, scale,
                          block_size=cfg.query_block)
        if out is not None:
            return out
    if _on_gpu(q.place):
        return dense_sdpa(q, k, v, q_offset, scale)
    return dense_causal_attention(q, k, v, q_offset, scale)


def _psa_one(q, k, v, cfg, q_offset, scale, call, timed):
    """Unpadded PSA (or dense below min_seq_len); adds this run's numbers to `call`."""
    Lq, Lk = q.shape[2], k.shape[2]
    clock = _Clock(timed, q.place, call)
    if Lq == 0 or Lk < cfg.min_seq_len:
        out = _dense(q, k, v, cfg, q_offset, scale)
        call.backend = call.backend or "dense"
        clock.lap("t_attention")
        return out
    levels = out = None
    if _on_gpu(q.place) and cfg.backend == "auto" and _TRITON_OFF is not None:
        out = dense_sdpa(q, k, v, q_offset, scale)  # Triton failed earlier in this process
        call.backend = call.backend or "dense"
        clock.lap("t_attention")
        return out
    if _wants_triton(cfg, q.place):
        fused = _run_triton(cfg, "estimate", _triton_fn("estimate"), q, k, cfg, q_offset)  # steps 1-4
        if fused is not None:
            levels = fused[0]
            clock.lap("t_estimate")
            out = _run_triton(cfg, "attention", _triton_fn("attention"), q, k, v, levels, q_offset, scale,
                              block_size=cfg.query_block)
        if out is not None:
            call.backend, call.estimate = "triton", "triton"
        elif _on_gpu(q.place):
            # the Triton path failed on a GPU: dense flash attention beats the plain-Paddle PSA there
            out = dense_sdpa(q, k, v, q_offset, scale)
            call.backend = call.backend or "dense"
            clock.lap("t_attention")
            return out
    if out is None:
        if levels is None:
            imp = block_importance(q, k, cfg, q_offset)
            clock.lap("t_estimate")
            levels = compute_levels(imp, k, cfg, q_offset)
            clock.lap("t_mask")
            call.estimate = "paddle"
        out = pyramid_attention_paddle(q, k, v, levels, q_offset, scale, block=cfg.query_block)
        call.backend = "paddle"
    clock.lap("t_attention")
    if timed:
        h = level_histogram_device(levels, q_offset, cfg.query_block, Lk)
        call._hist_dev = h if call._hist_dev is None else call._hist_dev + h
    return out


# ----------------------------------------------------------------------------- warm-up

def warmup(num_heads: int, num_kv_heads: int, head_dim: int, dtype: str, cfg: AttentionConfig) -> float:
    """Compile the Triton kernels now, for this model's head counts, head size and dtype, so
    that no prefill pays for it; seconds spent (0.0 where nothing is compiled: a CPU, or
    backend="paddle"). Call once per process at model load.

    Triton specialises a kernel on its integer arguments (== 1, divisible by 16), so it runs a
    block-aligned and an unaligned length, a fresh prefill and one after cached tokens, and the
    dense kernel below min_seq_len; a length with another pattern compiles at its first use.
    Triton keeps every compiled kernel on disk (``~/.triton/cache`` or ``$TRITON_CACHE_DIR``):
    a later process loads them instead of compiling. A Triton failure here takes the usual
    way: one warning, Triton off, the dense fallback.
    """
    if cfg.backend == "paddle" or not paddle.device.get_device().startswith("gpu"):
        return 0.0
    import dataclasses

    t0 = time.perf_counter()
    blk = cfg.query_block
    psa_cfg = dataclasses.replace(cfg, min_seq_len=0, text_length=min(cfg.text_length, 2 * blk))
    dense_cfg = dataclasses.replace(cfg, min_seq_len=1 << 30)
    for L in (16 * blk, 16 * blk - 3):
        q = paddle.randn([1, num_heads, L, head_dim]).astype(dtype)
        k = paddle.randn([1, num_kv_heads, L, head_dim]).astype(dtype)
        v = paddle.randn([1, num_kv_heads, L, head_dim]).astype(dtype)
        for c in (psa_cfg, dense_cfg):
            psa_attention(q, k, v, c)
            psa_attention(q[:, :, -100:], k, v, c)  # a question after cached tokens
    paddle.device.synchronize()
    return time.perf_counter() - t0
