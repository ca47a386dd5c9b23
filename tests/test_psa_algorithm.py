"""PSA plain-Paddle path against an independent float64 numpy implementation of the math.

The reference (tests/psa_reference.py) is written from the algorithm statement
(docs: psa-algorithm.md) with explicit loops and strided slices, sharing no code with psa_paddle.
"""
import math

import numpy as np
import paddle
import psa_reference as R
import pytest

from psa_paddle import AttentionConfig, PSAStats, TritonBackendError, flop_sparsity, psa_attention
from psa_paddle.attention import dense_causal_attention, pyramid_attention_paddle
from psa_paddle.estimate import block_importance
from psa_paddle.mask import compute_levels, force_blocks, levels_from_importance, similarity_cap
from psa_paddle.psa import level_histogram

# ----------------------------------------------------------------------------- reference
# The one float64 reference (tests/psa_reference.py), for one batch row: [H, L, D] in and out.


def ref_importance(q, k, blk, S, q_offset):
    return R.importance(q[None], k[None], blk, S, q_offset)[0]


def ref_raw_levels(imp, mode, ratios, qb0):
    return R.raw_levels(imp[None], mode, ratios, qb0)[0]


def ref_force(lv, text_length, blk, qb0):
    return R.force(lv, text_length, blk, qb0)


def ref_pad(x, blk):
    return R.pad_replicate(x, blk)


def ref_cap(k, blk, t2, t4, t8):
    return R.cap(k[None], blk, (t2, t4, t8))[0]


def ref_levels(q, k, cfg, q_offset):
    imp, lv = R.levels(q[None], k[None], cfg, q_offset)
    return imp[0], lv[0]


def ref_attention(q, k, v, lv, q_offset, blk, scale):
    return R.attention(q[None], k[None], v[None], lv[None], q_offset, scale, blk)[0]


def ref_dense(q, k, v, q_offset, scale):
    return R.dense(q[None], k[None], v[None], q_offset, scale)[0]


# ----------------------------------------------------------------------------- inputs


def make_keys(rng, H, L, D, blk):
    """Keys whose blocks are, at random, noise or a rotation at one of three speeds, so the
    similarity cap takes every value 1/2/4/8 (margins well away from the thresholds)."""
    k = rng.standard_normal((H, L, D)) * 0.5
    for h in range(H):
        for b in range(-(-L // blk)):
            omega = rng.choice([None, 0.4, 0.15, 0.02])
            if omega is None:
                continue
            d1, d2 = np.linalg.qr(rng.standard_normal((D, 2)))[0].T * math.sqrt(D) * 2
            t = np.arange(b * blk, min(L, (b + 1) * blk))
            k[h, t] = np.cos(omega * t)[:, None] * d1 + np.sin(omega * t)[:, None] * d2 \
                + 0.05 * rng.standard_normal((len(t), D))
    return k


def to_pd(x):
    return paddle.to_tensor(np.ascontiguousarray(x), dtype="float32")


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


CASES = [  # B, Hq, Hkv, Lq, Lk, D, blk, text_length, mode, cap
    (1, 2, 1, 1, 1, 64, 64, 64, "energybound", True),
    (2, 4, 2, 127, 127, 64, 64, 0, "energybound", True),
    (1, 2, 1, 128, 128, 128, 128, 0, "energybound", True),
    (1, 7, 1, 129, 129, 64, 64, 0, "topk", True),
    (1, 7, 1, 1000, 1000, 64, 64, 64, "energybound", True),
    (1, 4, 2, 1000, 1000, 128, 128, 0, "energybound", False),
    (1, 4, 2, 1000, 1000, 64, 64, 0, "topk", False),
    (2, 4, 2, 150, 700, 64, 64, 64, "energybound", True),
    (1, 7, 1, 150, 700, 128, 128, 0, "energybound", True),
    (1, 7, 1, 1, 700, 64, 64, 0, "energybound", True),
    (1, 2, 1, 1, 700, 64, 64, 128, "topk", True),
]


@pytest.mark.parametrize("B, Hq, Hkv, Lq, Lk, D, blk, text, mode, cap", CASES)
def test_matches_reference(B, Hq, Hkv, Lq, Lk, D, blk, text, mode, cap):
    rng = np.random.default_rng(Lq * 7 + Lk + D + Hq)
    cfg = AttentionConfig(query_block=blk, text_length=text, mask_mode=mode, use_sim_cap=cap,
                          min_seq_len=0, backend="paddle", xattn_chunk_size=2 * blk)
    q = rng.standard_normal((B, Hq, Lq, D))
    k = np.stack([make_keys(rng, Hkv, Lk, D, blk) for _ in range(B)])
    v = rng.standard_normal((B, Hkv, Lk, D))
    off = Lk - Lq
    scale = 1 / math.sqrt(D)
    imp = block_importance(to_pd(q), to_pd(k), cfg, off).numpy()
    lv = compute_levels(paddle.to_tensor(imp), to_pd(k), cfg, off).numpy()
    out = psa_attention(to_pd(q), to_pd(k), to_pd(v), cfg).numpy()
    assert out.dtype == np.float32 and out.shape == (B, Hq, Lq, D)
    for b in range(B):
        rimp, rlv = ref_levels(q[b], k[b], cfg, off)
        np.testing.assert_allclose(imp[b], rimp, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(lv[b], rlv)
        ref = ref_attention(q[b], k[b], v[b], rlv, off, blk, scale)
        assert rel_err(out[b], ref) < 1e-5
        np.testing.assert_allclose(out[b], ref, atol=1e-4 * np.abs(ref).max())


def test_reference_cases_exercise_every_level():
    seen = set()
    for B, Hq, Hkv, Lq, Lk, D, blk, text, mode, cap in CASES[4:7]:
        rng = np.random.default_rng(Lq * 7 + Lk + D + Hq)
        cfg = AttentionConfig(query_block=blk, text_length=text, mask_mode=mode, use_sim_cap=cap)
        q = rng.standard_normal((B, Hq, Lq, D))
        k = np.stack([make_keys(rng, Hkv, Lk, D, blk) for _ in range(B)])
        seen |= set(np.unique(ref_levels(q[0], k[0], cfg, Lk - Lq)[1]).tolist())
        cap_vals = ref_cap(k[0], blk, 0.75, 0.7, 0.7)
    assert seen == {0, 1, 2, 4}
    assert set(np.unique(cap_vals).tolist()) == {1, 2, 4, 8}


# ----------------------------------------------------------------------------- hand-made


def causal_levels(Hq, nqb, nkb, qb0, value=1):
    lv = np.zeros((1, Hq, nqb, nkb), np.int8)
    for r in range(nqb):
        lv[0, :, r, :qb0 + r + 1] = value
    return lv


@pytest.mark.parametrize("Lq, Lk", [(300, 300), (100, 300)])
def test_all_level_one_is_dense(Lq, Lk):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 4, Lq, 64)), rng.standard_normal((2, Lk, 64)), rng.standard_normal((2, Lk, 64))
    blk, off = 64, Lk - Lq
    nkb = -(-Lk // blk)
    lv = causal_levels(4, nkb - off // blk, nkb, off // blk)
    out = pyramid_attention_paddle(to_pd(q), to_pd(k[None]), to_pd(v[None]), paddle.to_tensor(lv), off, 0.125)
    assert rel_err(out.numpy()[0], ref_dense(q[0], k, v, off, 0.125)) < 1e-5


def test_one_block_at_level_two():
    """Block 1 (keys 64..127) pooled in pairs: its keys become pair means with logit + ln 2,
    each pair visible once both tokens are past; every other key is unchanged."""
    rng = np.random.default_rng(2)
    L, D, blk, kb = 256, 64, 64, 1
    q, k, v = (rng.standard_normal((1, L, D)) for _ in range(3))
    lv = causal_levels(1, 4, 4, 0)
    lv[0, 0, 1:, kb] = 2  # including the diagonal block (query block 1)
    out = pyramid_attention_paddle(to_pd(q[None]), to_pd(k[None]), to_pd(v[None]), paddle.to_tensor(lv), 0, 0.125)
    out = out.numpy()[0, 0]
    expected = np.zeros((L, D))
    inside = np.arange(kb * blk, (kb + 1) * blk)
    k2 = (k[0, inside[0::2]] + k[0, inside[1::2]]) / 2
    v2 = (v[0, inside[0::2]] + v[0, inside[1::2]]) / 2
    for p in range(L):
        plain = [j for j in range(p + 1) if j not in set(inside)]
        pairs = [i for i in range(blk // 2) if inside[2 * i + 1] <= p]
        logits = np.concatenate([q[0, p] @ k[0, plain].T * 0.125, q[0, p] @ k2[pairs].T * 0.125 + math.log(2)])
        w = np.exp(logits - logits.max())
        expected[p] = (w @ np.concatenate([v[0, plain], v2[pairs]])) / w.sum()
    np.testing.assert_allclose(out, expected, atol=2e-5)
    dense = ref_dense(q, k, v, 0, 0.125)[0]
    np.testing.assert_allclose(out[:blk], dense[:blk], atol=2e-5)  # rows before the block: unchanged
    assert np.abs(out[blk:] - dense[blk:]).max() > 1e-3


def test_query_that_sees_no_key_gets_zeros():
    """Only the diagonal block, pooled 2x: query 0 sees no whole pair yet, so its output is 0
    (the Triton kernel and the numpy reference agree); query 1 sees exactly the first pair."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 1, 128, 16)) for _ in range(3))
    lv = np.array([[[[2, 0], [1, 1]]]], np.int8)
    out = pyramid_attention_paddle(to_pd(q), to_pd(k), to_pd(v), paddle.to_tensor(lv), 0, 0.25, block=64)
    out = out.numpy()[0, 0]
    assert np.abs(out[0]).max() == 0.0
    np.testing.assert_allclose(out[1], (v[0, 0, 0] + v[0, 0, 1]) / 2, atol=1e-6)


def raw_levels(imp, cfg, qb0=0):
    return levels_from_importance(paddle.to_tensor(np.asarray(imp, np.float32)), cfg, qb0).numpy()


def test_energybound_default_ratios():
    # sorted: .5 (b1) .2 (b3) .15 (b4) .1 (b2) .05 (b0); energy .5 .7 .85 .95 1
    # b3 crosses .6 -> 2, b4 crosses .8 -> 4, b2 crosses .9: the 8x interval is empty -> 0
    imp = [[[[0.05, 0.5, 0.1, 0.2, 0.15]]]]
    assert raw_levels(imp, AttentionConfig(), qb0=4).tolist() == [[[[0, 1, 0, 2, 4]]]]


def test_energybound_exact_boundary_and_unsorted_rows():
    # energy exactly on a boundary stays in the lower level (lower < E <= hi)
    cfg = AttentionConfig(mask_ratios={1: (0, 0.5), 2: (0.5, 0.75), 0: (0.75, 1)})
    imp = [[[[0.125, 0.25, 0.5, 0.125], [0.5, 0.25, 0.125, 0.125]]]]
    assert raw_levels(imp, cfg, qb0=3).tolist() == [[[[0, 2, 1, 0], [1, 2, 0, 0]]]]


def test_energybound_past_last_interval_is_zero():
    cfg = AttentionConfig(mask_ratios={1: (0, 0.5), 2: (0.5, 0.7)})
    assert raw_levels([[[[0.5, 0.25, 0.25]]]], cfg, qb0=2).tolist() == [[[[1, 0, 0]]]]


def test_topk_levels():
    imp = np.array([0.3, 0.05, 0.2, 0.01, 0.15, 0.02, 0.1, 0.04, 0.08, 0.06])  # n = 10
    rank = np.argsort(-imp).argsort()
    expected = np.select([rank < 6, rank < 8, rank < 9], [1, 2, 4], 0)  # 8x: [9, 9) empty
    cfg = AttentionConfig(mask_mode="topk")
    assert raw_levels(imp.reshape(1, 1, 1, 10), cfg, qb0=9)[0, 0, 0].tolist() == expected.tolist()
    # causal row with n = 5 valid blocks of 10: cuts floor(5*.6)=3, floor(5*.8)=4, floor(5*.9)=4
    got = raw_levels(imp.reshape(1, 1, 1, 10), cfg, qb0=4)[0, 0, 0]
    r5 = np.argsort(-imp[:5]).argsort()
    assert got[:5].tolist() == np.select([r5 < 3, r5 < 4], [1, 2], 0).tolist()
    assert got[5:].tolist() == [0] * 5


def test_forced_blocks():
    cfg = AttentionConfig(query_block=64, text_length=65)  # 2 prompt blocks
    lv = force_blocks(paddle.zeros([1, 1, 6, 8], "int32"), cfg, qb0=2).numpy()[0, 0]
    expected = np.array([
        [1, 0, 1, 0, 0, 0, 0, 0],  # block 2: sink, diagonal
        [1, 0, 0, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 0],  # prompt rows see everything causal
        [1, 1, 1, 1, 1, 1, 1, 1],
    ])
    np.testing.assert_array_equal(lv, expected)
    full = force_blocks(paddle.full([1, 1, 6, 8], 4, "int32"), cfg, qb0=2).numpy()[0, 0]
    np.testing.assert_array_equal(full, np.where(expected == 1, 1, np.tril(np.full((6, 8), 4), 2)))


def test_similarity_cap_by_hand():
    D, blk = 64, 64
    rng = np.random.default_rng(3)
    d1, d2 = np.linalg.qr(rng.standard_normal((D, 2)))[0].T
    t = np.arange(blk)
    k = [rng.standard_normal((blk, D))]
    for omega in (0.4, 0.15, 0.02):  # cos(w), cos(3w), cos(7w) against .75 / .7 / .7
        k.append(np.cos(omega * t)[:, None] * d1 + np.sin(omega * t)[:, None] * d2)
    k.append(rng.standard_normal((10, D)))  # partial last block, padded by repetition
    k = np.concatenate(k)[None]
    cfg = AttentionConfig(query_block=blk)
    cap = similarity_cap(to_pd(k[None]), cfg).numpy()[0, 0]
    assert cap.tolist() == [1, 2, 4, 8, ref_cap(k, blk, 0.75, 0.7, 0.7)[0, -1]]


def test_flop_sparsity_and_stats():
    lv = np.zeros((1, 1, 2, 3), np.int8)
    lv[0, 0, 0, :2] = [1, 2]  # row = abs block 1: pairs (1,0) (1,1)
    lv[0, 0, 1, :3] = [4, 0, 1]
    # causal pairs: 1, 2, 4, 0, 1 -> mean(1/level) = (1 + .5 + .25 + 0 + 1) / 5
    assert flop_sparsity(paddle.to_tensor(lv), 100, 64, 150) == pytest.approx(1 - 2.75 / 5)
    assert level_histogram(paddle.to_tensor(lv), 100, 64, 150) == {0: 1, 1: 2, 2: 1, 4: 1, 8: 0}

    rng = np.random.default_rng(4)
    q, k, v = (to_pd(rng.standard_normal(s)) for s in ((1, 4, 300, 64), (1, 2, 300, 64), (1, 2, 300, 64)))
    stats = PSAStats()
    psa_attention(q, k, v, AttentionConfig(query_block=64, text_length=0, min_seq_len=0), stats=stats, layer_idx=3)
    psa_attention(q, k, v, AttentionConfig(min_seq_len=4096), stats=stats, layer_idx=4)
    psa_call, dense_call = stats.calls
    assert (psa_call.layer_idx, psa_call.seq_len, psa_call.q_len, psa_call.backend) == (3, 300, 300, "paddle")
    assert sum(psa_call.hist.values()) == 4 * 15  # heads x causal pairs of 5 blocks
    assert dense_call.backend == "dense" and stats.summary()["dense_calls"] == 1
    assert 0 <= stats.sparsity() == psa_call.sparsity < 1 and list(stats.by_layer()) == [3]
    assert min(psa_call.t_estimate, psa_call.t_mask, psa_call.t_attention) > 0


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("Lq", [300, 120])
def test_key_mask_equals_separate_runs(Lq):
    rng = np.random.default_rng(5)
    Lk, D = 320, 64
    cfg = AttentionConfig(query_block=64, text_length=64, min_seq_len=0)
    valid = [np.r_[np.zeros(10), np.ones(290), np.zeros(20)], np.r_[np.zeros(120), np.ones(200)]]
    key_mask = np.stack(valid).astype(bool)
    q = rng.standard_normal((2, 4, Lq, D))
    k = np.stack([make_keys(rng, 2, Lk, D, 64) for _ in range(2)])
    v = rng.standard_normal((2, 2, Lk, D))
    out = psa_attention(to_pd(q), to_pd(k), to_pd(v), cfg, key_mask=paddle.to_tensor(key_mask)).numpy()
    for b in range(2):
        km, qm = key_mask[b], key_mask[b, Lk - Lq:]
        alone = psa_attention(to_pd(q[b:b + 1, :, qm]), to_pd(k[b:b + 1, :, km]), to_pd(v[b:b + 1, :, km]), cfg)
        np.testing.assert_allclose(out[b][:, qm], alone.numpy()[0], atol=1e-6)
        assert not out[b][:, ~qm].any()


def test_dense_fallback_below_min_seq_len():
    rng = np.random.default_rng(6)
    q, k, v = rng.standard_normal((1, 4, 90, 64)), rng.standard_normal((1, 2, 200, 64)), rng.standard_normal((1, 2, 200, 64))
    out = psa_attention(to_pd(q), to_pd(k), to_pd(v), AttentionConfig(min_seq_len=201), scale=0.1).numpy()
    assert rel_err(out[0], ref_dense(q[0], k[0], v[0], 110, 0.1)) < 1e-5
    small = dense_causal_attention(to_pd(q), to_pd(k), to_pd(v), 110, 0.1, max_logits=1000).numpy()
    np.testing.assert_allclose(small, out, atol=1e-6)  # row chunking changes nothing


def test_q_offset_before_end_drops_future_keys():
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((1, 2, 50, 64)), rng.standard_normal((1, 1, 400, 64)), rng.standard_normal((1, 1, 400, 64))
    cfg = AttentionConfig(query_block=64, text_length=0, min_seq_len=0)
    a = psa_attention(to_pd(q), to_pd(k), to_pd(v), cfg, q_offset=200).numpy()
    b = psa_attention(to_pd(q), to_pd(k[:, :, :250]), to_pd(v[:, :, :250]), cfg).numpy()
    np.testing.assert_array_equal(a, b)


def test_bf16_output_dtype_and_backend_choice():
    q = paddle.randn([1, 2, 130, 64]).astype("bfloat16")
    k = paddle.randn([1, 1, 130, 64]).astype("bfloat16")
    stats = PSAStats()
    out = psa_attention(q, k, k, AttentionConfig(query_block=64, min_seq_len=0), stats=stats)
    assert out.dtype == paddle.bfloat16 and stats.calls[0].backend == "paddle"  # auto on CPU
    with pytest.raises(TritonBackendError, match="GPU"):
        psa_attention(q, k, k, AttentionConfig(query_block=64, min_seq_len=0, backend="triton"))


@pytest.mark.parametrize("bad", [
    dict(q=[1, 3, 10, 64], k=[1, 2, 10, 64]),
    dict(q=[1, 2, 20, 64], k=[1, 1, 10, 64]),
    dict(q=[1, 2, 10, 64], k=[1, 1, 10, 32]),
])
def test_shape_errors(bad):
    with pytest.raises(ValueError):
        psa_attention(paddle.zeros(bad["q"]), paddle.zeros(bad["k"]), paddle.zeros(bad["k"]), AttentionConfig())


def test_triton_backend_wiring(monkeypatch):
    """Backend choice with stand-ins for the Triton modules (the real ones are tested apart)."""
    import psa_paddle.psa as psa_mod

    calls = []

    def fake_est(q, k, cfg, q_offset):
        calls.append("estimate")
        imp = block_importance(q, k, cfg, q_offset)
        return compute_levels(imp, k, cfg, q_offset), imp

    def fake_attn(q, k, v, levels, q_offset, scale, **kw):
        calls.append("attention")
        return pyramid_attention_paddle(q, k, v, levels, q_offset, scale)

    def refuse(*args, **kw):
        raise ValueError("head_dim must be a power of two")

    rng = np.random.default_rng(8)
    q, k, v = (to_pd(rng.standard_normal(s)) for s in ((1, 2, 200, 64), (1, 1, 200, 64), (1, 1, 200, 64)))
    small = dict(query_block=64, text_length=0, min_seq_len=0)
    plain = psa_attention(q, k, v, AttentionConfig(backend="paddle", **small)).numpy()
    fakes = {"estimate": fake_est, "attention": fake_attn}
    monkeypatch.setattr(psa_mod, "_import_triton", lambda name: fakes[name])
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # explicit "triton" off-GPU: interpreter only
    stats = PSAStats()
    out = psa_attention(q, k, v, AttentionConfig(backend="triton", **small), stats=stats).numpy()
    assert calls == ["estimate", "attention"] and (stats.calls[0].backend, stats.calls[0].estimate) == ("triton", "triton")
    np.testing.assert_array_equal(out, plain)
    calls.clear()
    psa_attention(q, k, v, AttentionConfig(backend="auto", **small))  # auto on CPU: plain Paddle
    assert calls == []

    monkeypatch.setattr(psa_mod, "_wants_triton", lambda cfg, place: True)  # as on a GPU
    fakes.update(estimate=refuse, attention=refuse)
    stats = PSAStats()
    with pytest.warns(UserWarning, match="power of two"):
        out = psa_attention(q, k, v, AttentionConfig(backend="auto", **small), stats=stats).numpy()
    np.testing.assert_array_equal(out, plain)
    assert (stats.calls[0].backend, stats.calls[0].estimate) == ("paddle", "paddle")
    with pytest.raises(ValueError, match="power of two"):
        psa_attention(q, k, v, AttentionConfig(backend="triton", **small))

    def no_triton(name):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(psa_mod, "_import_triton", no_triton)  # modules failed to import
    with pytest.raises(TritonBackendError, match="not importable"):
        psa_attention(q, k, v, AttentionConfig(backend="triton", **small))
    try:
        with pytest.warns(UserWarning, match="Triton is off for this process: Triton is not importable"):
            assert psa_attention(q, k, v, AttentionConfig(backend="auto", **small)).shape == [1, 2, 200, 64]
    finally:
        psa_mod.reset_triton_state()
