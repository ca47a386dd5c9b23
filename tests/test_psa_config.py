"""AttentionConfig defaults, validation (one test per rule) and JSON-style input."""
import json

import pytest

from psa_paddle import DEFAULT_MASK_RATIOS, AttentionConfig, ConfigError


def test_defaults():
    cfg = AttentionConfig()
    assert cfg.text_length == 512 and cfg.query_block == 128 and cfg.xattn_stride == 16
    assert cfg.mask_mode == "energybound" and cfg.backend == "auto" and cfg.use_sim_cap
    assert (cfg.sim_2x_threshold, cfg.sim_4x_threshold, cfg.sim_8x_threshold) == (0.75, 0.7, 0.7)
    assert list(cfg.mask_ratios.items()) == [(1, (0.0, 0.6)), (2, (0.6, 0.8)), (4, (0.8, 0.9)),
                                            (8, (0.9, 0.9)), (0, (0.9, 1.0))]
    assert dict(DEFAULT_MASK_RATIOS) == cfg.mask_ratios


def test_default_ratios_not_shared():
    a, b = AttentionConfig(), AttentionConfig()
    a.mask_ratios[1] = (0.0, 0.5)
    assert b.mask_ratios[1] == (0.0, 0.6)
    with pytest.raises(TypeError):
        DEFAULT_MASK_RATIOS[1] = (0.0, 0.1)


def test_string_keys_from_json():
    raw = json.loads('{"1": [0, 0.5], "2": [0.5, 0.9], "0": [0.9, 1]}')
    cfg = AttentionConfig(mask_ratios=raw)
    assert list(cfg.mask_ratios.items()) == [(1, (0.0, 0.5)), (2, (0.5, 0.9)), (0, (0.9, 1.0))]


def test_from_dict_roundtrip_and_unknown_key():
    cfg = AttentionConfig(text_length=64, query_block=64, mask_mode="topk")
    again = AttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ConfigError, match="unknown"):
        AttentionConfig.from_dict({"text_len": 3})


@pytest.mark.parametrize("ratios, match", [
    ({1: (0.0, 1.2)}, "inside"),
    ({1: (-0.1, 1.0)}, "inside"),
    ({1: (0.0, 0.6), 2: (0.8, 0.7)}, "lo > hi"),
    ({1: (0.0, 0.6), 2: (0.5, 0.8)}, "contiguous"),  # overlap
    ({1: (0.0, 0.6), 2: (0.7, 0.8)}, "contiguous"),  # gap
    ({1: (0.0, 0.6), 2: (0.6, 0.8), 4: (0.5, 0.5)}, "increasing order"),
    ({1: (0.2, 1.0)}, "start at 0"),
    ({3: (0.0, 1.0)}, "not allowed"),
    ({16: (0.0, 1.0)}, "not allowed"),
    ({"x": (0.0, 1.0)}, "not a level"),
    ({1.5: (0.0, 1.0)}, "not a level"),
    ({1: 0.5}, "pair"),
    ({1: (0.0, 0.5, 1.0)}, "pair"),
    ({1: (0.0, 0.5), "1": (0.5, 1.0)}, "twice"),
    ({}, "empty"),
    ([(1, (0, 1))], "dict"),
])
def test_bad_ratios(ratios, match):
    with pytest.raises(ConfigError, match=match):
        AttentionConfig(mask_ratios=ratios)


@pytest.mark.parametrize("kw, match", [
    ({"query_block": 256}, "query_block"),
    ({"query_block": 32}, "query_block"),
    ({"xattn_stride": 24}, "divide"),
    ({"xattn_stride": 0}, "xattn_stride"),
    ({"mask_mode": "topp"}, "mask_mode"),
    ({"backend": "cuda"}, "backend"),
    ({"sim_2x_threshold": 1.5}, r"\[-1, 1\]"),
    ({"sim_4x_threshold": -1.01}, r"\[-1, 1\]"),
    ({"sim_8x_threshold": "0.7"}, r"\[-1, 1\]"),
    ({"text_length": -1}, "text_length"),
    ({"min_seq_len": 1.5}, "min_seq_len"),
    ({"xattn_chunk_size": 0}, "xattn_chunk_size"),
    ({"use_sim_cap": 1}, "use_sim_cap"),
])
def test_bad_fields(kw, match):
    with pytest.raises(ConfigError, match=match):
        AttentionConfig(**kw)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_edge_values_accepted():
    cfg = AttentionConfig(query_block=64, xattn_stride=64, text_length=0, min_seq_len=0,
                          sim_2x_threshold=-1, sim_4x_threshold=1.0, mask_ratios={1: (0, 1)})
    assert (cfg.query_block, cfg.xattn_stride, cfg.text_length, cfg.min_seq_len) == (64, 64, 0, 0)
    assert (cfg.sim_2x_threshold, cfg.sim_4x_threshold) == (-1, 1.0) and dict(cfg.mask_ratios) == {1: (0, 1)}
    empty = AttentionConfig(mask_ratios={0: (0, 0), 1: (0, 1)})  # empty intervals are fine
    assert dict(empty.mask_ratios) == {0: (0, 0), 1: (0, 1)}
