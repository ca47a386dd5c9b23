"""The options every entry point shares (command line, Python API, corpus mode): one set of
defaults and one set of checks.

This module imports no Paddle and no model code, so `--help` and the argument checks answer in
well under a second.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from .errors import InputError

DEFAULT_FPS = 1.0  # video frames sampled per second, as qwen-vl-utils
DEFAULT_MAX_TOKENS = 512


def default_prompt(kind: str) -> str:
    """The question asked when the user gives none."""
    return f"Describe this {kind}."


@dataclass
class GenerationOptions:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def validate(self) -> GenerationOptions:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InputError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InputError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InputError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and not _is_int(self.seed):
            raise InputError(f"--seed must be an integer, got {self.seed!r}")
        return self

    @classmethod
    def from_args(cls, args) -> GenerationOptions:
        """The generation options of a parsed command line (argparse names = field names)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)}).validate()

    def as_dict(self) -> dict:
        return asdict(self)


def check_fps(fps: Any) -> float:
    if not _is_number(fps) or fps <= 0:
        raise InputError(f"--fps must be > 0 (frames per second), got {fps!r}; e.g. --fps {DEFAULT_FPS}")
    return float(fps)


def check_prompt(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError("the prompt is empty: say what you want to know, e.g. --prompt 'Describe this image'")
    return text


def psa_config_from_args(args):
    """An AttentionConfig from --use-psa and its options, or None when PSA is off.

    Only the options the user gave are passed: AttentionConfig holds every default."""
    if not args.use_psa:
        return None
    from psa_paddle import AttentionConfig, ConfigError  # imports Paddle: only when PSA is asked for

    given = {"query_block": args.query_block, "xattn_stride": args.xattn_stride,
             "min_seq_len": args.psa_min_seq_len}
    try:
        return AttentionConfig(**{k: v for k, v in given.items() if v is not None})
    except ConfigError as e:
        raise InputError(f"{e} (--query-block, --xattn-stride, --psa-min-seq-len)") from e


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
