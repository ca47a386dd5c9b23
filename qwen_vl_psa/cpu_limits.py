"""What a CPU can take: the default image pixel cap, a memory estimate checked before anything
large is allocated, and each call's own peak RSS. Imports no Paddle.

The GPU keeps the Qwen defaults (up to 16384 tokens, 12.8 MP, per image). On the CPU an image
larger than CPU_IMAGE_MAX_PIXELS (1280 tokens, about 1 MP: what Qwen's own examples pass as
max_pixels) is downsized unless the user gives a pixel limit, with one notice line; the vision
encoder then takes seconds, not minutes. A limit the user raises is honoured as long as the
estimate below fits in the memory the machine has available.
"""
from __future__ import annotations

from typing import Optional

PATCH = 14
TOKEN_PIXELS = 28 * 28
CPU_IMAGE_MAX_PIXELS = 1280 * TOKEN_PIXELS  # 1,003,520 pixels = 1280 image tokens
BYTES = 4  # the CPU runs in float32


def cap_notice(label: str, size: tuple, new: tuple) -> str:
    return (f"{label} is {size[0]}x{size[1]}; downsized to {new[0]}x{new[1]} (the CPU default cap of "
            f"{CPU_IMAGE_MAX_PIXELS} pixels, 1280 tokens); pass --max-pixels to change it")


def available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate_bytes(patches: int, text_tokens: int, vision_cfg, text_cfg) -> int:
    """Peak working memory of one cold call on the CPU beyond the loaded weights (rough, on the
    high side), linear in the patches: both the vision encoder's attention and the language
    model's dense prefill run in blocks of rows there (vision_attention.py). Per patch: the
    processor's pixel rows (1176 floats, a few copies) and the vision layer activations; per
    token: the prefill activations and the KV cache. Measured: tiny model, 62k patches, 0.9 GB."""
    vh, vi = vision_cfg.hidden_size, vision_cfg.intermediate_size
    vision = patches * (3 * 1176 + 16 * vh + 6 * vi) * BYTES
    T = text_tokens + patches // 4
    heads, hidden, inter = text_cfg.num_attention_heads, text_cfg.hidden_size, text_cfg.intermediate_size
    kv = 2 * text_cfg.num_hidden_layers * text_cfg.num_key_value_heads * (hidden // heads)
    text = T * (8 * hidden + 3 * inter + kv) * BYTES
    return int(max(vision, text) + (256 << 20))  # + the attention blocks and allocator slack


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


# ----------------------------------------------------------------------------- per-call peak RSS

def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process: Linux >= 4.0, writing 5 to
    /proc/self/clear_refs. False where that is not possible (then the lifetime peak is reported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since the last reset_peak_rss (VmHWM), else the process's lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
