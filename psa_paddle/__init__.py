"""Pyramid Sparse Attention (PSA) for PaddlePaddle: plain-Paddle reference path + Triton kernels."""
from .config import DEFAULT_MASK_RATIOS, AttentionConfig, ConfigError
from .psa import (
    PSACall,
    PSAStats,
    TritonBackendError,
    flop_sparsity,
    level_histogram,
    psa_attention,
    reset_triton_state,
    triton_off_reason,
    warmup,
)

__all__ = [
    "AttentionConfig",
    "ConfigError",
    "DEFAULT_MASK_RATIOS",
    "PSACall",
    "PSAStats",
    "flop_sparsity",
    "level_histogram",
    "psa_attention",
    "reset_triton_state",
    "triton_off_reason",
    "TritonBackendError",
    "warmup",
]
