#!/usr/bin/env python3
"""End-to-end prefill of Qwen2.5-VL-7B at real sizes on the GPU (PyTorch host): where the time to
first token goes, and what PSA changes.

Never imported by the product. Random bf16 weights at the model's real shapes:

* language model: 28 decoder layers, hidden 3584, MLP 18944 (SwiGLU), 28 query / 4 KV heads of
  128, q/k/v projections with bias, RMSNorm, rotary embedding (1-D positions; M-RoPE costs the same);
* vision encoder: patch 14, temporal patch 2 (one LM token = 2 frames x 28x28 pixels after the 2x2
  spatial merge), 32 blocks, hidden 1280, 16 heads of 80, SwiGLU MLP 3420, window attention over
  112-pixel windows (8x8 patches) except blocks 7, 15, 23, 31, which attend over a whole temporal
  patch; then the patch merger (2x2 -> 5120 -> 5120 -> 3584).

Frames: the bench input's layout, 16x28 merged tokens per temporal patch (448x784 pixels), and a
512-token prompt at the end: N tokens = 448 * T + 512.

Attention backends of the language model: FA2 (torch SDPA flash), cuDNN (torch SDPA cuDNN), our
dense Triton kernel (every block level 1), and PSA (the Triton estimate on the layer's own q and k,
then the pyramid kernel). With random weights the layer's q/k carry no video structure, so the PSA
attention uses the level map the estimate gives on a bench input of the same length
(``bench/video_like.py``, "bench" or "rough"); the estimate itself runs on the layer's q/k, so its
cost is real. Level maps are computed once per length and reused by every layer.

Timing: CUDA events around whole forwards, median over --reps after one warm-up. To keep GPU time
small, ``--layers`` LM layers are timed (default 2) and scaled to 28, and one window block plus one
full-attention block of the vision encoder are timed and scaled to 28 + 4 (stated in the output).
Peak memory: measured over the timed layers (their weights included), plus the full model's weights
and the KV cache of 28 layers, computed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
# bench_psa makes the kernel modules importable without Paddle (its psa_paddle stand-in package)
from bench_psa import Cfg, sparsity, video_qkv  # noqa: E402

from psa_paddle import triton_attention as TA  # noqa: E402
from psa_paddle import triton_estimate as TE  # noqa: E402

DEV = "cuda"
DT = torch.bfloat16
LM = dict(layers=28, hidden=3584, inter=18944, hq=28, hkv=4, d=128, eps=1e-6)
VIT = dict(depth=32, hidden=1280, heads=16, inter=3420, patch=14, tpatch=2, merge=2, window=112,
           full=(7, 15, 23, 31), out=3584)
TOK_H, TOK_W, TEXT = 16, 28, 512  # merged tokens per temporal patch, prompt tokens
LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def timed(fn, reps):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def w(*shape, scale=0.02):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(DT)


def rms(x, g, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * g


# ============================================================================ language model

class LMLayer:
    def __init__(self):
        H, I, hq, hkv, d = LM["hidden"], LM["inter"], LM["hq"], LM["hkv"], LM["d"]
        self.wqkv = w((hq + 2 * hkv) * d, H)
        self.bqkv = w((hq + 2 * hkv) * d)
        self.wo = w(H, hq * d)
        self.wgu = w(2 * I, H)
        self.wd = w(H, I)
        self.g1 = torch.ones(H, device=DEV, dtype=DT)
        self.g2 = torch.ones(H, device=DEV, dtype=DT)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.wqkv, self.bqkv, self.wo, self.wgu, self.wd))

    def qkv(self, x, cos, sin):
        hq, hkv, d = LM["hq"], LM["hkv"], LM["d"]
        N = x.shape[1]
        y = F.linear(rms(x, self.g1), self.wqkv, self.bqkv)
        q, k, v = y.split([hq * d, hkv * d, hkv * d], -1)
        q = q.view(1, N, hq, d).transpose(1, 2)
        k = k.view(1, N, hkv, d).transpose(1, 2)
        v = v.view(1, N, hkv, d).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def rest(self, x, o):
        N = x.shape[1]
        x = x + F.linear(o.transpose(1, 2).reshape(1, N, -1), self.wo)
        g, u = F.linear(rms(x, self.g2), self.wgu).chunk(2, -1)
        return x + F.linear(F.silu(g) * u, self.wd)

    def __call__(self, x, cos, sin, attn):
        q, k, v = self.qkv(x, cos, sin)
        return self.rest(x, attn(q, k, v))


def rope_tables(N, d, base=1e6):
    inv = 1.0 / (base ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    f = torch.outer(torch.arange(N, device=DEV, dtype=torch.float32), inv)
    e = torch.cat([f, f], -1)
    return e.cos().to(DT), e.sin().to(DT)


def rope(x, cos, sin):
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"fa2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def fn(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return fn


def triton_dense(q, k, v):
    return TA.dense_attention_triton(q, k, v, 0, 1 / math.sqrt(q.shape[-1]))


def psa_with(levels):
    """PSA: the estimate on this layer's q/k (real cost), attention on the bench input's level map."""

    def fn(q, k, v):
        TE.estimate_levels_triton(q, k, Cfg, 0)
        return TA.pyramid_attention_triton(q, k, v, levels, 0, 1 / math.sqrt(q.shape[-1]))
    return fn


# ============================================================================ vision encoder

class VitBlock:
    def __init__(self):
        C, I = VIT["hidden"], VIT["inter"]
        self.wqkv, self.bqkv = w(3 * C, C), w(3 * C)
        self.wo, self.bo = w(C, C), w(C)
        self.wgu, self.bgu = w(2 * I, C), w(2 * I)
        self.wd, self.bd = w(C, I), w(C)
        self.g1 = torch.ones(C, device=DEV, dtype=DT)
        self.g2 = torch.ones(C, device=DEV, dtype=DT)

    def __call__(self, x, groups):
        """x [P, C] in window order; ``groups`` equal-size attention groups (windows or frames)."""
        P, C = x.shape
        nh = VIT["heads"]
        d = C // nh
        y = F.linear(rms(x, self.g1), self.wqkv, self.bqkv).view(groups, P // groups, 3, nh, d)
        q, k, v = y.permute(2, 0, 3, 1, 4).unbind(0)  # [groups, heads, n, d]
        o = F.scaled_dot_product_attention(q, k, v)  # rotary embedding omitted: elementwise, small
        x = x + F.linear(o.transpose(1, 2).reshape(P, C), self.wo, self.bo)
        g, u = F.linear(rms(x, self.g2), self.wgu, self.bgu).chunk(2, -1)
        return x + F.linear(F.silu(g) * u, self.wd, self.bd)


def vit_parts():
    C = VIT["hidden"]
    patch_in = 3 * VIT["tpatch"] * VIT["patch"] ** 2
    m = VIT["merge"] ** 2 * C
    return dict(patch=w(C, patch_in), block=VitBlock(), mg=torch.ones(C, device=DEV, dtype=DT),
                m1=w(m, m), mb1=w(m), m2=w(VIT["out"], m), mb2=w(VIT["out"]))


def vit_time(parts, n_tok, reps):
    """ms for the encoder of the frames behind ``n_tok`` video tokens: patch embed + 28 window
    blocks + 4 full blocks (one of each timed) + merger."""
    T = n_tok // (TOK_H * TOK_W)  # temporal patches
    ph, pw = TOK_H * VIT["merge"], TOK_W * VIT["merge"]  # patches per temporal patch
    P = T * ph * pw
    win = VIT["window"] // VIT["patch"]
    n_win = T * (ph // win) * (pw // win)
    pix = torch.randn(P, 3 * VIT["tpatch"] * VIT["patch"] ** 2, device=DEV, dtype=DT)
    blk = parts["block"]
    x = F.linear(pix, parts["patch"])
    t_embed = timed(lambda: F.linear(pix, parts["patch"]), reps)
    t_win = timed(lambda: blk(x, n_win), reps)
    t_full = timed(lambda: blk(x, T), reps)

    def merger():
        y = rms(x, parts["mg"]).view(P // 4, 4 * VIT["hidden"])
        y = F.gelu(F.linear(y, parts["m1"], parts["mb1"]))
        return F.linear(y, parts["m2"], parts["mb2"])
    t_merge = timed(merger, reps)
    n_full = len(VIT["full"])
    total = t_embed + (VIT["depth"] - n_full) * t_win + n_full * t_full + t_merge
    del pix, x
    return dict(patches=P, frames=T * VIT["tpatch"], embed=t_embed, win_block=t_win, full_block=t_full,
                merger=t_merge, total=total)


# ============================================================================ main

def run(sizes, n_layers, reps, inputs, backends):
    torch.manual_seed(0)
    layers = [LMLayer() for _ in range(n_layers)]
    layer_bytes = layers[0].nbytes()
    vit = vit_parts()
    vit_bytes = (sum(t.numel() for t in (vit["block"].wqkv, vit["block"].wo, vit["block"].wgu, vit["block"].wd))
                 * 2 * VIT["depth"] + sum(vit[k].numel() * 2 for k in ("patch", "m1", "m2")))
    H = LM["hidden"]
    embed_bytes = 152064 * H * 2 * 2  # embedding + lm_head (vocab 152064), counted, never timed
    rows = []
    for N in sizes:
        t0 = time.time()
        n_vid = N - TEXT
        with torch.inference_mode():
            # level maps from the bench inputs at this length (the 7B's heads)
            maps = {}
            for inp in inputs:
                q, k, _ = video_qkv(N, LM["hq"], LM["hkv"], inp=inp)
                lev, _ = TE.estimate_levels_triton(q, k, Cfg, 0)
                maps[inp] = (lev, sparsity(lev))
                del q, k
            torch.cuda.empty_cache()
            vt = vit_time(vit, n_vid, reps)
            cos, sin = rope_tables(N, LM["d"])
            x0 = (torch.randn(1, N, H, device=DEV) * 0.5).to(DT)
            attn_fns = {}
            for b in backends:
                if b in ("fa2", "cudnn"):
                    attn_fns[b] = sdpa(b)
                elif b == "triton":
                    attn_fns[b] = triton_dense
                elif b == "psa":
                    for inp in inputs:
                        attn_fns[f"psa[{inp}]"] = psa_with(maps[inp][0])
            q, k, v = layers[0].qkv(x0, cos, sin)
            t_est = timed(lambda: TE.estimate_levels_triton(q, k, Cfg, 0), reps)
            t_qkv = timed(lambda: layers[0].qkv(x0, cos, sin), reps)
            o = attn_fns[next(iter(attn_fns))](q, k, v)
            t_rest = timed(lambda: layers[0].rest(x0, o), reps)
            del o
            res = dict(N=N, vision=vt, est_ms=t_est, qkv_ms=t_qkv, rest_ms=t_rest,
                       sparsity={i: maps[i][1] for i in inputs}, backends={})
            for name, fn in attn_fns.items():
                t_attn = timed(lambda: fn(q, k, v), reps)

                def fwd():
                    x = x0
                    for L in layers:
                        x = L(x, cos, sin, fn)
                    return x
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t_layers = timed(fwd, reps)
                peak = torch.cuda.max_memory_allocated() - base
                per_layer = t_layers / n_layers
                lm = per_layer * LM["layers"]
                res["backends"][name] = dict(attn_ms=t_attn, layer_ms=per_layer, lm_ms=lm,
                                             ttft_ms=lm + vt["total"], peak_act_gib=peak / 2**30)
                log(f"  N={N} {name:12s} attention {t_attn:8.2f} ms  layer {per_layer:8.2f} ms  "
                    f"LM x28 {lm:9.1f} ms  TTFT {lm + vt['total']:9.1f} ms  peak transient {peak / 2**30:.2f} GiB")
            del q, k, v, x0, cos, sin, maps
            torch.cuda.empty_cache()
        kv = LM["layers"] * 2 * N * LM["hkv"] * LM["d"] * 2
        res["kv_cache_gib"] = kv / 2**30
        res["weights_gib"] = (layer_bytes * LM["layers"] + vit_bytes + embed_bytes) / 2**30
        rows.append(res)
        log(f"N={N}: vision {vt['total']:.1f} ms ({vt['frames']} frames, {vt['patches']} patches; window block "
            f"{vt['win_block']:.2f} ms, full block {vt['full_block']:.2f} ms), estimate {t_est:.2f} ms/layer, "
            f"qkv+norm+rope {t_qkv:.2f}, o_proj+MLP {t_rest:.2f} ms/layer ({time.time() - t0:.0f}s)")
    return rows


def tables(rows, n_layers):
    out = [f"LM layers timed: {n_layers} (scaled to 28); vision: one window block and one full block timed "
           "(scaled to 28 + 4), plus patch embed and merger.", "",
           "| N | backend | vision ms | LM linear+norm ms (x28) | LM attention ms (x28) | of which estimate | "
           "TTFT ms | TTFT vs cuDNN | peak GiB (weights + KV cache + transient) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r["backends"].get("cudnn", {}).get("ttft_ms")
        for name, b in r["backends"].items():
            attn28 = b["attn_ms"] * 28
            other28 = b["lm_ms"] - attn28
            est = f"{r['est_ms'] * 28:.0f}" if name.startswith("psa") else "-"
            sp = ""
            if name.startswith("psa["):
                sp = f" (s={r['sparsity'][name[4:-1]]:.2f})"
            peak = r["weights_gib"] + r["kv_cache_gib"] + b["peak_act_gib"]
            out.append(f"| {r['N'] // 1024}K | {name}{sp} | {r['vision']['total']:.0f} | {other28:.0f} | "
                       f"{attn28:.0f} | "
                       f"{est} | {b['ttft_ms']:.0f} | {b['ttft_ms'] / ref:.3f} | "
                       f"{peak:.1f} ({r['weights_gib']:.1f} + {r['kv_cache_gib']:.1f} + {b['peak_act_gib']:.1f}) |"
                       if ref else f"| {r['N'] // 1024}K | {name} | ... |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--inputs", default="bench,rough")
    ap.add_argument("--backends", default="fa2,cudnn,triton,psa")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    log(f"torch {torch.__version__}, triton {__import__('triton').__version__}, {torch.cuda.get_device_name()}")
    t0 = time.time()
    rows = []
    try:
        rows = run([int(x) for x in a.sizes.split(",")], a.layers, a.reps, a.inputs.split(","),
                   a.backends.split(","))
    except Exception:
        import traceback
        log(f"FAILED:\n{traceback.format_exc()}")
    finally:
        if rows:
            log(tables(rows, a.layers))
        log(f"elapsed {time.time() - t0:.0f}s")
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "prefill_log.txt").write_text("\n".join(LOG) + "\n")
        (Path(a.out) / "prefill_results.json").write_text(json.dumps(rows, default=str, indent=1))


if __name__ == "__main__":
    main()
