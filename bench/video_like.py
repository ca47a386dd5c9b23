"""A video-like attention input (numpy, fixed seed): smooth over frame, row and column, a sink
token at position 0 and a text prompt at the end.

Tokens are laid out like Qwen2.5-VL's prefill: T frames of H x W patches, then the prompt.
Each token has a latent vector: a sum of features that vary smoothly along frame index, row
and column (random walks), so nearby tokens in time and space are similar; the prompt tokens
are independent random latents. A shared latent direction appears in every query, and the
key of token 0 points along it (the attention sink). Per head, queries and keys are the
latent through one random projection plus a little head-specific noise (so q_i . k_j grows
with the latents' similarity), values through another.
"""
from __future__ import annotations

import math

import numpy as np

FRAME_H, FRAME_W = 16, 28  # 448 tokens per frame (a 448x784 frame at 28-pixel merged patches)
LATENT = 64


def _walk(rng, n, step):
    x = np.cumsum(rng.standard_normal((n, LATENT)) * step, axis=0)
    x += rng.standard_normal((1, LATENT))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


STEPS = (0.5, 0.25, 0.25)  # random-walk step per frame, per row, per column
NOISE = 0.1  # per-token latent noise
TEMPERATURE = 4.0  # query scale: sets how peaked attention is
SPATIAL = 0.7  # weight of the row and column features, shared by every frame


def latents(n_tokens: int, text: int = 512, seed: int = 0, steps=STEPS, noise=NOISE, spatial=SPATIAL) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_vid = max(0, n_tokens - text)
    n_txt = n_tokens - n_vid
    per = FRAME_H * FRAME_W
    T = max(1, -(-n_vid // per))
    frame, row, col = _walk(rng, T, steps[0]), _walk(rng, FRAME_H, steps[1]), _walk(rng, FRAME_W, steps[2])
    t = np.arange(n_vid) // per
    y = (np.arange(n_vid) % per) // FRAME_W
    x = np.arange(n_vid) % FRAME_W
    z_vid = 1.0 * frame[t] + spatial * row[y] + spatial * col[x] + noise * rng.standard_normal((n_vid, LATENT))
    z_txt = rng.standard_normal((n_txt, LATENT))
    z = np.concatenate([z_vid, z_txt], 0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    shared = np.zeros(LATENT)
    shared[0] = 1.0
    z = 0.92 * z + 0.35 * shared
    z[0] = 2.5 * shared  # the sink
    return z.astype(np.float32)


def video_like_factors(n_tokens: int, n_q_heads: int, n_kv_heads: int, head_dim: int = 128, text: int = 512,
                       seed: int = 0, temperature: float = TEMPERATURE, steps=STEPS, noise=NOISE, spatial=SPATIAL):
    """-> z [N, LATENT], wq [Hq, LATENT, D], wk, wv [Hkv, LATENT, D]: q = z @ wq per head, etc."""
    z = latents(n_tokens, text, seed, steps, noise, spatial)
    rng = np.random.default_rng(seed + 1)
    G = n_q_heads // n_kv_heads
    wk = rng.standard_normal((n_kv_heads, LATENT, head_dim)).astype(np.float32)
    wv = rng.standard_normal((n_kv_heads, LATENT, head_dim)).astype(np.float32) / math.sqrt(LATENT)
    wq = np.repeat(wk, G, 0) + 0.5 * rng.standard_normal((n_q_heads, LATENT, head_dim)).astype(np.float32)
    wq *= temperature
    return z, wq, wk, wv


def video_like_qkv(n_tokens: int, n_q_heads: int, n_kv_heads: int, head_dim: int = 128, **kw):
    """-> q [1, Hq, N, D], k, v [1, Hkv, N, D] float32 numpy arrays."""
    z, wq, wk, wv = video_like_factors(n_tokens, n_q_heads, n_kv_heads, head_dim, **kw)
    q = np.matmul(z[None], wq)[None]  # BLAS, [1, H, N, D]
    k = np.matmul(z[None], wk)[None]
    v = np.matmul(z[None], wv)[None]
    return q, k, v
