"""Route the Qwen2.5-VL language model's self-attention through PSA during prefill.

    state = apply_psa(model, AttentionConfig())   # PSA on (prefill of >= cfg.min_seq_len tokens)
    state.stats.summary()                         # sparsity, level histogram, timings
    remove_psa(model)                             # the model's own attention again

paddleformers looks the attention function up by name (`config._attn_implementation`) on every
call, so registering one function and renaming the *text* config's implementation is the whole
patch: the vision encoder keeps its config and its attention, and decoding steps (one query
token) go straight to the model's own fast kernel.

The router also fixes dense prefill that continues a KV cache (a question after a cached video):
Paddle's `is_causal` aligns the causal mask to the top-left, which is only right when the query
and key lengths are equal, so such calls get an explicit offset-causal mask here.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import paddle
import paddle.nn.functional as F
from paddleformers.nn.attention.interface import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from psa_paddle import AttentionConfig, PSAStats, psa_attention, triton_off_reason

from .vision_attention import MAX_SCORE_ELEMENTS, causal_chunked

ROUTER = "qwen_vl_psa_router"


@dataclass
class PSAState:
    """Lives on the text config; `config=None` means dense attention (with correct offsets)."""
    base_impl: str  # the model's own attention implementation name
    config: Optional[AttentionConfig] = None
    stats: PSAStats = field(default_factory=PSAStats)
    decode_calls: int = 0
    prefill_calls: int = 0

    def reset(self):
        self.stats.reset()
        self.decode_calls = self.prefill_calls = 0

    def summary(self) -> dict:
        """Numbers for print_stats / --json: PSA prefill calls only, dense ones counted apart."""
        s = self.stats.summary()
        hist = s["histogram"]
        n = sum(hist.values())
        psa_calls = [c for c in self.stats.calls if c.backend != "dense"]
        return {
            "enabled": self.config is not None,
            "calls": s["psa_calls"],
            "dense_prefill_calls": self.prefill_calls - s["psa_calls"],
            "decode_calls": self.decode_calls,
            "seq_len": max((c.seq_len for c in psa_calls), default=0),
            "sparsity": s["sparsity"],
            "sparsity_by_layer": {str(k): v for k, v in self.stats.by_layer().items()},
            "level_fractions": {str(k): (v / n if n else 0.0) for k, v in hist.items()},
            "backend": psa_calls[0].backend if psa_calls else None,
            "estimate_s": s["t_estimate"],
            "mask_s": s["t_mask"],
            "attention_s": s["t_attention"],
            "min_seq_len": self.config.min_seq_len if self.config else None,
            "triton_off": triton_off_reason(),  # why the GPU fell back to dense attention, if it did
        }


def _text_config(model):
    return model.config.text_config


def _key_padding(attention_mask, Lk: int):
    """[B, Lk] bool of real keys from the model's mask, or None when every key is real."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.ndim == 4:  # additive or boolean [B, 1, Lq, Lk]: the last query row sees every real key
        row = m[:, 0, -1, :]
        keep = row if row.dtype == paddle.bool else row > -1e4
    else:
        keep = m.astype("bool")
    keep = keep[:, -Lk:]
    return None if bool(keep.all()) else keep


def _dense_offset_causal(query, key, value, scaling, q_offset):
    """Dense attention where query i sits at position q_offset + i (GQA via enable_gqa)."""
    Lq, Lk = query.shape[2], key.shape[2]
    qpos = paddle.arange(q_offset, q_offset + Lq).reshape([Lq, 1])
    allowed = paddle.arange(Lk).reshape([1, Lk]) <= qpos
    # Paddle's sdpa takes [B, L, H, D]; the scale is folded into q because it ignores `scale`.
    q = query.transpose([0, 2, 1, 3]) * (scaling * math.sqrt(query.shape[-1]))
    out = F.scaled_dot_product_attention(q, key.transpose([0, 2, 1, 3]), value.transpose([0, 2, 1, 3]),
                                         attn_mask=allowed, is_causal=False, training=False, enable_gqa=True)
    return out


def router(module, query, key, value, attention_mask=None, attn_mask_startend_row_indices=None, dropout=0.0,
           sink=None, scaling=None, is_causal=None, **kw):
    """The attention function the text layers call: decode -> base, prefill -> PSA or dense."""
    state: PSAState = module.config._psa_state
    base = ALL_ATTENTION_FUNCTIONS[state.base_impl]
    B, Hq, Lq, D = query.shape
    Lk = key.shape[2]
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(D)
    if Lq == 1:
        state.decode_calls += 1
        return base(module, query, key, value, attention_mask=attention_mask,
                    attn_mask_startend_row_indices=attn_mask_startend_row_indices, dropout=dropout, sink=sink,
                    scaling=scaling, is_causal=False, **kw)
    state.prefill_calls += 1
    key_mask = _key_padding(attention_mask, Lk)
    cfg = state.config
    if cfg is not None and Lk >= cfg.min_seq_len:
        out = psa_attention(query, key, value, cfg, q_offset=Lk - Lq, key_mask=key_mask, scale=scaling,
                            stats=state.stats, layer_idx=getattr(module, "layer_idx", None))
        return out.transpose([0, 2, 1, 3]).reshape([B, Lq, Hq * D]), None
    if attention_mask is not None:
        # only a padded batch gets a mask here; the model built it with the right offsets
        return base(module, query, key, value, attention_mask=attention_mask, dropout=dropout, sink=sink,
                    scaling=scaling, **kw)
    if Lq == Lk:
        if not query.place.is_gpu_place():  # Paddle's CPU sdpa builds [heads, T, T]: bound it
            if B * Hq * Lq * Lk > MAX_SCORE_ELEMENTS:
                return causal_chunked(query, key, value, scaling), None
        out = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask=None, dropout=0.0,
                                              scaling=scaling, is_causal=True)[0]
        return out, None
    out = _dense_offset_causal(query, key, value, scaling, Lk - Lq)
    return out.reshape([B, Lq, Hq * D]), None


def install_router(model) -> PSAState:
    """Put the router in front of the text attention (PSA off); idempotent."""
    cfg = _text_config(model)
    state = getattr(cfg, "_psa_state", None)
    if state is None or cfg._attn_implementation != ROUTER:
        AttentionInterface.register(ROUTER, router)
        state = PSAState(base_impl=cfg._attn_implementation)
        cfg._psa_state = state
        cfg._attn_implementation = ROUTER
    _check_layers_share(model, cfg)
    return state


def apply_psa(model, config: Optional[AttentionConfig] = None) -> PSAState:
    """PSA on for the language model's prefill; returns the state that holds its stats."""
    state = install_router(model)
    state.config = config or AttentionConfig()
    state.reset()
    return state


def remove_psa(model):
    """The model's own attention again, as before install_router / apply_psa."""
    cfg = _text_config(model)
    state = getattr(cfg, "_psa_state", None)
    if state is not None:
        cfg._attn_implementation = state.base_impl
        del cfg._psa_state


def reusable_prefix(config: Optional[AttentionConfig], prefix_len: int) -> Tuple[int, Optional[AttentionConfig]]:
    """(n, cfg): prefill the first n tokens of a prompt prefix once, with `cfg`, and cache them;
    any continuation prefilled after them (the rest of the prefix, then a question) then gets the
    attention of one prefill over the whole prompt (identical logits in tests/test_session.py).

    Dense attention: n = prefix_len. PSA decides per query block from the whole prompt: the last
    `text_length` tokens are forced to full resolution (in a one-shot prefill they are the
    question and the tail of the prefix), and a block that straddles the split point would see a
    different importance estimate. So n stops at a block boundary ceil(text_length / BLK) blocks
    before the prefix's last whole block, and those n tokens are prefilled without forced text
    rows (a one-shot prefill forces none of them either); the few hundred prefix tokens after n
    are prefilled again with each question. A one-shot prefill uses PSA when the whole prompt
    reaches min_seq_len, the cached part when the prefix does: only a question that carries the
    prompt across min_seq_len gets a (slightly) different attention than its cold run.
    """
    if config is None:
        return prefix_len, None
    blk = config.query_block
    n = blk * max(0, prefix_len // blk - math.ceil(config.text_length / blk))
    cfg = dataclasses.replace(config, text_length=0, min_seq_len=max(0, config.min_seq_len - (prefix_len - n)))
    return n, cfg


def _check_layers_share(model, cfg):
    """The patch relies on every text layer reading this very config object."""
    for layer in model.model.language_model.layers:
        if layer.self_attn.config is not cfg:
            raise RuntimeError("paddleformers changed how Qwen2.5-VL layers hold their config; "
                               "qwen_vl_psa/psa_router.py needs updating")
