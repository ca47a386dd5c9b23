"""PSA quality on a synthetic video-like prefill (CPU, plain Paddle, float32).

Layout of one sequence: a sink token at position 0 (large-norm key along the queries' common
direction), video tokens on a (frame, row, column) grid with smooth features, then the text
prompt (the last 200 tokens, random). q/k/v are low-frequency sinusoids of the grid position
projected through fixed random matrices plus small noise; k shares most of q's projection so
attention favours nearby tokens in space and time, as video attention does. No RoPE.

Reports, with the default AttentionConfig (BLK 128, energybound, default ratios, cap on):
FLOP-equivalent sparsity and ||out - dense|| / ||dense|| at 8K and 32K tokens.

    /work/venv/bin/python bench/psa_quality.py [--lengths 8192 32768] [--heads 4:1 2:1]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import paddle

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from psa_paddle import AttentionConfig, PSAStats, psa_attention  # noqa: E402
from psa_paddle.attention import dense_causal_attention  # noqa: E402

D = 128  # Qwen2.5-VL-7B head_dim
GRID = (16, 24)  # tokens per frame after the 2x2 merge, a 448x672 frame
TEXT = 200
N_WAVES = 32


def grid_positions(n: int) -> np.ndarray:
    """[n, 3] (frame, row, column) of n video tokens in raster order."""
    per_frame = GRID[0] * GRID[1]
    i = np.arange(n)
    return np.stack([i // per_frame, (i % per_frame) // GRID[1], i % GRID[1]], 1).astype(np.float64)


def video_features(pos: np.ndarray, rng) -> np.ndarray:
    """[n, 3] -> [n, 2*N_WAVES]: cos/sin of low-frequency waves over (frame, row, column)."""
    freq = rng.uniform(-1, 1, (N_WAVES, 3)) * np.array([0.15, 0.35, 0.35])  # rad per step
    phase = rng.uniform(0, 2 * np.pi, N_WAVES)
    arg = pos @ freq.T + phase
    return np.concatenate([np.cos(arg), np.sin(arg)], 1) / math.sqrt(N_WAVES)


def make_inputs(L: int, Hq: int, Hkv: int, seed: int = 0):
    """-> q [1, Hq, L, D], k, v [1, Hkv, L, D] float32 numpy."""
    rng = np.random.default_rng(seed)
    n_vid = L - 1 - TEXT
    phi = video_features(grid_positions(n_vid), rng)  # [n_vid, F]
    F = phi.shape[1]
    q = np.empty((Hq, L, D), np.float32)
    k = np.empty((Hkv, L, D), np.float32)
    v = np.empty((Hkv, L, D), np.float32)
    G = Hq // Hkv
    for kv in range(Hkv):
        wk = rng.standard_normal((F, D)) * 0.75
        wv = rng.standard_normal((F, D))
        bias = rng.standard_normal(D) * 0.6  # the queries' common direction
        k[kv, 1:1 + n_vid] = phi @ wk + 0.1 * rng.standard_normal((n_vid, D))
        v[kv, 1:1 + n_vid] = phi @ wv + 0.1 * rng.standard_normal((n_vid, D))
        k[kv, 0] = bias / np.linalg.norm(bias) * 12.0  # sink: larger norm than any video key
        v[kv, 0] = rng.standard_normal(D) * 0.3
        k[kv, -TEXT:] = rng.standard_normal((TEXT, D)) * 0.75
        v[kv, -TEXT:] = rng.standard_normal((TEXT, D))
        for g in range(G):
            h = kv * G + g
            wq = wk + rng.standard_normal((F, D)) * 0.4  # shares k's projection: local attention
            q[h, 1:1 + n_vid] = phi @ wq + bias + 0.1 * rng.standard_normal((n_vid, D))
            q[h, 0] = bias
            q[h, -TEXT:] = rng.standard_normal((TEXT, D)) * 0.75 + bias
    return q[None], k[None], v[None]


def run(L: int, Hq: int, Hkv: int) -> dict:
    q, k, v = (paddle.to_tensor(x) for x in make_inputs(L, Hq, Hkv))
    cfg = AttentionConfig(backend="paddle")
    stats = PSAStats()
    t0 = time.perf_counter()
    out = psa_attention(q, k, v, cfg, stats=stats)
    t_psa = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense = dense_causal_attention(q, k, v, 0, 1 / math.sqrt(D))
    t_dense = time.perf_counter() - t0
    err = float((out - dense).norm() / dense.norm())
    # per-row error too: the prompt rows are what the answer is generated from
    text_err = float((out[:, :, -TEXT:] - dense[:, :, -TEXT:]).norm() / dense[:, :, -TEXT:].norm())
    call = stats.calls[0]
    n = sum(call.hist.values())
    return dict(L=L, heads=f"{Hq}q/{Hkv}kv", sparsity=call.sparsity, rel_err=err, text_rows_rel_err=text_err,
                levels={lv: round(c / n, 3) for lv, c in call.hist.items()},
                t_estimate=call.t_estimate, t_mask=call.t_mask, t_attention=call.t_attention,
                t_psa=t_psa, t_dense=t_dense)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--heads", nargs="+", default=["4:1", "2:1"], help="Hq:Hkv per length (last repeats)")
    args = ap.parse_args()
    for i, L in enumerate(args.lengths):
        Hq, Hkv = map(int, args.heads[min(i, len(args.heads) - 1)].split(":"))
        r = run(L, Hq, Hkv)
        print(f"L={r['L']:6d} {r['heads']}: sparsity {r['sparsity']:.3f}  rel_err {r['rel_err']:.4f}  "
              f"(prompt rows {r['text_rows_rel_err']:.4f})  levels {r['levels']}  "
              f"psa {r['t_psa']:.1f}s [est {r['t_estimate']:.1f} mask {r['t_mask']:.1f} "
              f"attn {r['t_attention']:.1f}]  dense {r['t_dense']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
