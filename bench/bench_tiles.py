#!/usr/bin/env python3
"""Issue 9: every GPU class's PSA tile set (psa_paddle/tiles.py), run on one H200.

A proxy: the H200 (9.0, 227 KiB per block) can run every class's tiles, so each set is checked
against a float32 reference and timed on the same card, beside the H200 set, the old default
tiles, FlashAttention-2 and cuDNN (torch SDPA backends). It says how much slower a smaller
class's tiles are *on this card*; on the class's own GPU (mma.sync, smaller caches, other
clocks) the numbers differ.

Also: what the PSA stats cost per layer, the old way (3 device synchronisations and 5 host
copies per layer) against the new way (CUDA events and a device-side histogram, read once),
emulated with PyTorch (Paddle is not on the GPU machine).

PyTorch tensors are the host arrays (never imported by the product). Run:
    python bench/bench_tiles.py [--seq 32768] [--check-seq 4000]
"""
from __future__ import annotations

# ruff: noqa: B023  (the lambdas are timed at once, inside their loop iteration)
import argparse
import datetime
import json
import math
import os
import sys
import time
import types
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parent.parent
_pkg = types.ModuleType("psa_paddle")  # the kernel modules without psa_paddle/__init__ (Paddle)
_pkg.__path__ = [str(ROOT / "psa_paddle")]
sys.modules.setdefault("psa_paddle", _pkg)
from psa_paddle import tiles as TL  # noqa: E402
from psa_paddle import triton_attention as TA  # noqa: E402
from psa_paddle import triton_estimate as TE  # noqa: E402
from psa_paddle.config import AttentionConfig  # noqa: E402

DEV = "cuda"
BLK = 128
LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


def sets():
    """(label, attention tiles, use_tma, estimate tiles) as each class runs them: TMA loads only
    where the kernels' auto rule uses them (9.x); the other classes' plain kernels forced here."""
    out = []
    for ts in TL.TILE_SETS:
        label = f"{ts.name} (>= {ts.min_shared // 1024} KiB)"
        if ts.attention_tma is not None:
            out.append((label + ", TMA", ts.attention_tma, True, ts.estimate))
            label += ", plain"
        out.append((label, ts.attention, False, tuple(ts.estimate[:5]) + ("plain",)))
    return out


# ----------------------------------------------------------------------------- reference

def _pyramid_fp32(x, blk):
    """[Hkv, L, D] -> [x1, x2, x4, x8] float32, padded to blocks by replicating the last token."""
    L = x.shape[1]
    Lp = -(-L // blk) * blk
    x = x.float()
    if Lp > L:
        x = torch.cat([x, x[:, -1:].expand(-1, Lp - L, -1)], 1)
    out = [x]
    for _ in range(3):
        x = 0.5 * (x[:, 0::2] + x[:, 1::2])
        out.append(x)
    return out


def ref_psa(q, k, v, levels, q_offset, scale, blk=BLK):
    """float32 PSA step 5 by definition: one softmax over every level's pooled keys, the
    logit bonus ln(r), pooled key j visible to position p iff (j+1)*r - 1 <= p."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.empty(B, Hq, Lq, D, dtype=torch.float32, device=q.device)
    pos = q_offset + torch.arange(Lq, device=q.device)
    qrow = pos // blk - q_offset // blk
    for b in range(B):
        kp, vp = _pyramid_fp32(k[b], blk), _pyramid_fp32(v[b], blk)
        for h in range(Hq):
            hk = h // G
            lv_rows = levels[b, h].long()[qrow]  # [Lq, nKB]
            logits, vals = [], []
            for r, kr, vr in zip((1, 2, 4, 8), kp, vp):
                n = kr.shape[1]
                j = torch.arange(n, device=q.device)
                ok = (lv_rows[:, (j * r) // blk] == r) & (((j + 1) * r - 1)[None, :] <= pos[:, None])
                s = q[b, h].float() @ kr[hk].T * scale + math.log(r)
                logits.append(s.masked_fill(~ok, float("-inf")))
                vals.append(vr[hk])
            p = torch.softmax(torch.cat(logits, 1), 1)
            out[b, h] = p @ torch.cat(vals, 0)
    return out


def random_levels(Hq, nQB, nKB, qb0, seed=0, p=(0.2, 0.35, 0.25, 0.12, 0.08)):
    g = torch.Generator(device="cpu").manual_seed(seed)
    choice = torch.tensor([0, 1, 2, 4, 8], dtype=torch.int8)
    idx = torch.multinomial(torch.tensor(p), Hq * nQB * nKB, replacement=True, generator=g)
    lv = choice[idx].reshape(1, Hq, nQB, nKB)
    kb = torch.arange(nKB)[None, :]
    qb = (qb0 + torch.arange(nQB))[:, None]
    diag = choice[1:][torch.randint(0, 4, (1, Hq, nQB, 1), generator=g)]
    lv = torch.where(kb > qb, torch.zeros_like(lv), lv)
    lv = torch.where(kb == qb, diag.expand_as(lv), lv)
    lv[..., 0] = 1
    return lv.to(DEV)


def relerr(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ----------------------------------------------------------------------------- runs

def check(seq, dtypes):
    log(f"\n## Correctness: every tile set against the float32 reference (Lk={seq}, also Lq<Lk, GQA 4/2, D 128)")
    log("| tile set | attention tiles | dtype | PSA mask rel. L2 | Lq<Lk rel. L2 | dense rel. L2 | all written |")
    log("|---|---|---|---|---|---|---|")
    ok_all = True
    for name, att, tma, _ in sets():
        for dt in dtypes:
            torch.manual_seed(1)
            Hq, Hkv, D = 4, 2, 128
            q = torch.randn(1, Hq, seq, D, device=DEV).to(dt)
            k = torch.randn(1, Hkv, seq, D, device=DEV).to(dt)
            v = torch.randn(1, Hkv, seq, D, device=DEV).to(dt)
            scale = D ** -0.5
            nKB = -(-seq // BLK)
            row = [name, str(att), str(dt).split(".")[-1]]
            written = True
            try:
                for q_offset in (0, seq - 1000):
                    qq = q[:, :, q_offset:]
                    lv = random_levels(Hq, nKB - q_offset // BLK, nKB, q_offset // BLK, seed=q_offset)
                    out = torch.full_like(qq, float("nan"))
                    TA.pyramid_attention_triton(qq, k, v, lv, q_offset, scale, tiles=att, out=out, use_tma=tma)
                    torch.cuda.synchronize()
                    written &= not bool(out.isnan().any())
                    row.append(f"{relerr(out, ref_psa(qq, k, v, lv, q_offset, scale)):.2e}")
                out = TA.dense_attention_triton(q, k, v, 0, scale, tiles=att, use_tma=tma)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q.float(), k.float().repeat_interleave(Hq // Hkv, 1), v.float().repeat_interleave(Hq // Hkv, 1),
                    is_causal=True, scale=scale)
                row.append(f"{relerr(out, ref):.2e}")
                row.append("yes" if written else "NO")
                ok = written and max(float(x) for x in row[3:6]) < 1e-2
            except Exception as e:  # noqa: BLE001
                row += [f"{type(e).__name__}: {str(e)[:80]}", "", "", ""]
                ok = False
            ok_all &= ok
            log("| " + " | ".join(row) + " |")
    log(f"all within 1e-2 and fully written: {ok_all}")
    return ok_all


def _sdpa(q, k, v, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"FA2": SDPBackend.FLASH_ATTENTION, "cuDNN": SDPBackend.CUDNN_ATTENTION}[backend]
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1).contiguous(), v.repeat_interleave(G, 1).contiguous()

    def run():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
    return run


def timing(seq, dtypes, rep):
    log(f"\n## Timing on the H200 (Lk=Lq={seq}, Qwen2.5-VL-7B heads 28/4, D 128; do_bench median ms)")
    log("| dtype | tile set | attention tiles | estimate tiles | PSA attention ms | x H200 set | dense kernel ms "
        "| x H200 set | estimate ms | x H200 set | dense kernel / FA2 | dense kernel / cuDNN |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for dt in dtypes:
        torch.manual_seed(0)
        q = torch.randn(1, 28, seq, 128, device=DEV).to(dt)
        k = torch.randn(1, 4, seq, 128, device=DEV).to(dt)
        v = torch.randn(1, 4, seq, 128, device=DEV).to(dt)
        cfg = AttentionConfig()
        h200 = TL.TILE_SETS[0]
        lv, _ = TE.estimate_levels_triton(q, k, cfg, 0, tiles=h200.estimate)
        base = {}
        t_fa2 = do_bench(_sdpa(q, k, v, "FA2"), rep=rep, return_mode="median")
        try:
            t_cudnn = do_bench(_sdpa(q, k, v, "cuDNN"), rep=rep, return_mode="median")
        except Exception as e:  # noqa: BLE001
            log(f"cuDNN unavailable: {e}")
            t_cudnn = float("nan")
        nq = lv.shape[2]
        causal = torch.arange(nq, device=DEV)[None, :] <= torch.arange(nq, device=DEV)[:, None]
        lvf = lv.float()
        inv = torch.where(lvf > 0, 1.0 / lvf.clamp(min=1), torch.zeros_like(lvf))
        sparsity = 1 - float(inv[..., causal].mean())
        log(f"<!-- {dt}: mask from the estimate on random inputs, FLOP-equivalent sparsity {sparsity:.3f}; "
            f"FA2 {t_fa2:.3f} ms, cuDNN {t_cudnn:.3f} ms -->")
        for name, att, tma, est in sets():
            try:
                t_att = do_bench(lambda: TA.pyramid_attention_triton(q, k, v, lv, 0, 0.088, tiles=att, use_tma=tma),
                                 rep=rep, return_mode="median")
                t_den = do_bench(lambda: TA.dense_attention_triton(q, k, v, 0, 0.088, tiles=att, use_tma=tma),
                                 rep=rep, return_mode="median")
                t_est = do_bench(lambda: TE.estimate_levels_triton(q, k, cfg, 0, tiles=est), rep=rep,
                                 return_mode="median")
            except Exception as e:  # noqa: BLE001
                log(f"| {str(dt).split('.')[-1]} | {name} | {att} | {est} | {type(e).__name__}: {str(e)[:80]} |")
                continue
            if not base:
                base = {"att": t_att, "den": t_den, "est": t_est}
            results[(str(dt), name)] = (t_att, t_den, t_est)
            log(f"| {str(dt).split('.')[-1]} | {name} | {att} | {est} | {t_att:.3f} | {t_att / base['att']:.2f} | "
                f"{t_den:.3f} | {t_den / base['den']:.2f} | {t_est:.3f} | {t_est / base['est']:.2f} | "
                f"{t_den / t_fa2:.2f} | {t_den / t_cudnn:.2f} |")
        log(f"| {str(dt).split('.')[-1]} | FA2 (SDPA flash) |  |  |  |  | {t_fa2:.3f} |  |  |  |  |  |")
        log(f"| {str(dt).split('.')[-1]} | cuDNN (SDPA cudnn) |  |  |  |  | {t_cudnn:.3f} |  |  |  |  |  |")
    return results


def stats_cost(seq, layers=28, reps=5):
    """Per-layer cost of the stats: old (3 syncs + 5 host copies) against new (events + device
    histogram), around the real PSA kernel of one layer; PyTorch stands in for Paddle."""
    log(f"\n## Stats cost per layer ({layers} layers of PSA attention at Lk={seq}, bf16, 7B heads; host wall time)")
    torch.manual_seed(0)
    q = torch.randn(1, 28, seq, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 4, seq, 128, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cfg = AttentionConfig()
    ts = TL.TILE_SETS[0]
    nkb = -(-seq // BLK)
    causal = torch.arange(nkb, device=DEV)[None, :] <= torch.arange(nkb, device=DEV)[:, None]
    ref = torch.tensor([0, 1, 2, 4, 8], device=DEV, dtype=torch.int32)

    def layer():
        lv, _ = TE.estimate_levels_triton(q, k, cfg, 0, tiles=ts.estimate)
        out = TA.pyramid_attention_triton(q, k, v, lv, 0, 0.088, tiles=ts.attention_tma)
        return lv, out

    def hist_dev(lv):
        x = torch.where(causal, lv.int(), torch.full_like(lv, -1, dtype=torch.int32)).reshape(-1, 1)
        return (x == ref).sum(0)

    def run(mode):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pending = []
        for _ in range(layers):
            if mode == "old":
                torch.cuda.synchronize()
                lv, _ = layer()
                torch.cuda.synchronize()
                torch.cuda.synchronize()
                [int(c) for c in hist_dev(lv)]  # five host copies
            elif mode == "new":
                e0 = torch.cuda.Event(enable_timing=True)
                e0.record()
                lv, _ = layer()
                e1 = torch.cuda.Event(enable_timing=True)
                e1.record()
                pending.append((e0, e1, hist_dev(lv)))
            else:
                layer()
        if mode == "new":  # read once after the prefill
            [(a.elapsed_time(b), h.tolist()) for a, b, h in pending]
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1000

    for m in ("none", "old", "new"):
        run(m)
    res = {m: sorted(run(m) for _ in range(reps))[reps // 2] for m in ("none", "old", "new")}
    log("| stats | prefill attention ms (28 layers) | per layer over no stats, ms |")
    log("|---|---|---|")
    for m in ("none", "old", "new"):
        log(f"| {m} | {res[m]:.2f} | {(res[m] - res['none']) / layers:+.3f} |")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--check-seq", type=int, default=4000)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    dtypes = [torch.bfloat16, torch.float16]
    log(f"# bench_tiles: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{torch.cuda.get_device_name()}, Triton {triton.__version__}, torch {torch.__version__}")
    t0 = time.time()
    if "check" not in args.skip:
        check(args.check_seq, dtypes)
    log(f"(check took {time.time() - t0:.0f} s)")
    if "timing" not in args.skip:
        timing(args.seq, dtypes, args.rep)
    if "stats" not in args.skip:
        stats_cost(args.seq)
    out = os.environ.get("OUT")
    if out:
        Path(out, "bench_tiles.md").write_text("\n".join(LOG) + "\n")
        Path(out, "bench_tiles.json").write_text(json.dumps({"log": LOG}))
    log(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
