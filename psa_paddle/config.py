"""AttentionConfig: every PSA knob in one validated record."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType

# level -> (lo, hi) energy (or rank) interval, walked in this order. The 8x interval is empty
# on purpose: the published Qwen setting never uses 8x pooling.
DEFAULT_MASK_RATIOS = MappingProxyType(
    {1: (0.0, 0.6), 2: (0.6, 0.8), 4: (0.8, 0.9), 8: (0.9, 0.9), 0: (0.9, 1.0)}
)

VALID_LEVELS = (0, 1, 2, 4, 8)
SUPPORTED_BLOCKS = (64, 128)  # the Triton kernels are written for these tile sizes
MASK_MODES = ("energybound", "topk")
BACKENDS = ("auto", "triton", "paddle")
_EPS = 1e-9  # slack for "contiguous" checks on ratios typed as decimals


def ratio_intervals(mask_ratios):
    """The one interval rule: ``(level, lower, hi)`` in insertion order with
    ``lower = max(lo, previous hi)``, so intervals never overlap. energybound gives a block the
    level where ``lower < E <= hi``; topk where ``floor(n*lower) <= rank < floor(n*hi)``."""
    prev_hi = None
    for level, (lo, hi) in dict(mask_ratios).items():
        lo, hi = float(lo), float(hi)
        lower = lo if prev_hi is None else max(lo, prev_hi)
        prev_hi = hi
        yield int(level), lower, hi


def block_from_levels_shape(Lk: int, q_offset: int, n_rows: int, n_cols: int) -> int:
    """The one block-size rule: the block a levels map ``[.., n_rows, n_cols]`` was built with.

    The smallest power of two >= 16 with ``ceil(Lk/BLK) == n_cols`` and
    ``n_cols - q_offset//BLK == n_rows``. Unique except when ``n_cols == 1``, where every such
    block describes the same single block and gives the same result. Callers that know
    ``cfg.query_block`` pass it instead.
    """
    for e in range(4, 16):
        blk = 1 << e
        if -(-Lk // blk) == n_cols and n_cols - q_offset // blk == n_rows:
            return blk
    raise ValueError(f"levels shape [.., {n_rows}, {n_cols}] fits no power-of-two block for Lk={Lk}, "
                     f"q_offset={q_offset}")


class ConfigError(ValueError):
    """An AttentionConfig value that PSA cannot run with."""


@dataclass
class AttentionConfig:
    text_length: int = 512  # the prompt's last tokens: forced to full resolution
    query_block: int = 128  # BLK: query block = key block size
    mask_mode: str = "energybound"
    mask_ratios: dict = field(default_factory=lambda: dict(DEFAULT_MASK_RATIOS))
    xattn_stride: int = 16  # S of the antidiagonal estimate
    xattn_chunk_size: int = 4096  # query rows per estimate chunk: memory ~ chunk/S * L/S
    sim_2x_threshold: float = 0.75
    sim_4x_threshold: float = 0.7
    sim_8x_threshold: float = 0.7
    # Below this many keys psa_attention runs dense causal attention. The estimate costs about
    # L^2*D/S multiply-adds plus a fixed per-call cost (sorting, level bookkeeping, several
    # launches), and the sparse kernel is slower than dense per visited block; with the
    # default 512-token prompt forced to level 1, a 4K sequence keeps ~1/8 of its block rows
    # dense anyway. Dense attention is < 1 ms per layer at 4K on an H100, so PSA cannot pay
    # off there; from ~8K its savings (quadratic) outgrow the overheads (linear-ish).
    min_seq_len: int = 8192
    use_sim_cap: bool = True
    backend: str = "auto"

    def __post_init__(self):
        self.mask_ratios = _normalise_ratios(self.mask_ratios)
        self._check_ints()
        if self.query_block not in SUPPORTED_BLOCKS:
            raise ConfigError(
                f"query_block must be one of {SUPPORTED_BLOCKS} (the kernels' tile sizes), "
                f"got {self.query_block}."
            )
        if self.query_block % self.xattn_stride:
            raise ConfigError(
                f"xattn_stride ({self.xattn_stride}) must divide query_block ({self.query_block})."
            )
        if self.mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")
        for name in ("sim_2x_threshold", "sim_4x_threshold", "sim_8x_threshold"):
            t = getattr(self, name)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1.0 <= t <= 1.0:
                raise ConfigError(f"{name} is a cosine similarity and must lie in [-1, 1], got {t!r}.")
        if not isinstance(self.use_sim_cap, bool):
            raise ConfigError(f"use_sim_cap must be True or False, got {self.use_sim_cap!r}.")
        _check_ratios(self.mask_ratios)

    def _check_ints(self):
        minimum = {"text_length": 0, "query_block": 1, "xattn_stride": 1,
                   "xattn_chunk_size": 1, "min_seq_len": 0}
        for name, lo in minimum.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}.")

    @classmethod
    def from_dict(cls, d: dict) -> AttentionConfig:
        """Build from a JSON-like dict; unknown keys are an error, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown AttentionConfig field(s) {unknown}; known: {sorted(names)}.")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mask_ratios"] = {str(k): list(v) for k, v in self.mask_ratios.items()}
        return d


def _normalise_ratios(ratios) -> dict:
    """Accept {level: (lo, hi)} with int or str keys (JSON) and list or tuple values."""
    if not hasattr(ratios, "items"):
        raise ConfigError(f"mask_ratios must be a dict level -> (lo, hi), got {type(ratios).__name__}.")
    out = {}
    for key, val in ratios.items():
        try:
            level = int(key)
            if isinstance(key, float) or str(level) != str(key).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"mask_ratios key {key!r} is not a level; levels are {VALID_LEVELS}.") from None
        if level not in VALID_LEVELS:
            raise ConfigError(f"mask_ratios level {level} is not allowed; levels are {VALID_LEVELS}.")
        if level in out:
            raise ConfigError(f"mask_ratios gives level {level} twice.")
        try:
            lo, hi = (float(x) for x in val)
        except (TypeError, ValueError):
            raise ConfigError(f"mask_ratios[{level}] must be a pair (lo, hi) of numbers, got {val!r}.") from None
        out[level] = (lo, hi)
    if not out:
        raise ConfigError("mask_ratios is empty; give at least one level interval.")
    return out


def _check_ratios(ratios: dict):
    prev = None
    for level, (lo, hi) in ratios.items():
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            raise ConfigError(f"mask_ratios[{level}] = ({lo}, {hi}) must lie inside [0, 1].")
        if lo > hi:
            raise ConfigError(f"mask_ratios[{level}] = ({lo}, {hi}) has lo > hi.")
        if prev is None:
            if lo > _EPS:
                raise ConfigError(
                    f"the first mask_ratios interval (level {level}) must start at 0, got {lo}; "
                    "otherwise the most important blocks would get no level."
                )
        else:
            plevel, (plo, phi) = prev
            if lo < plo:
                raise ConfigError(
                    f"mask_ratios intervals must be in increasing order: level {level} starts at "
                    f"{lo}, before level {plevel} ({plo})."
                )
            if abs(lo - phi) > _EPS:
                raise ConfigError(
                    f"mask_ratios intervals must be contiguous: level {level} starts at {lo} but "
                    f"level {plevel} ends at {phi}."
                )
        prev = (level, (lo, hi))
