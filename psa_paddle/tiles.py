"""Tile sizes of the PSA Triton kernels per GPU class, chosen from what Triton's driver reports.

A tile set must fit the GPU's shared memory per block with room to spare. What a compiled
kernel needs (``compiled.metadata.shared``) depends on the tiles, the pipeline depth
(``num_stages``), the head size and the target's code path (``mma.sync`` on 7.5-8.9 and 12.0,
``wgmma`` on 9.0, ``tcgen05`` on 10.0); ``tests/test_gpu_targets.py`` compiles every kernel
for every class below (no GPU needed) and checks each fits with at least :data:`SPARE` bytes
left, in bfloat16 and float16, head size 128.

Selection (:func:`select`) walks :data:`TILE_SETS`, largest first, and takes the first set
whose minimum compute capability and shared memory the device meets. A GPU not listed in
:data:`GPU_CLASSES` (a new card, a Jetson) therefore gets the largest set its shared memory
allows. Results on an H200 of every set (a proxy: same card, other classes' tiles) are in
bench/RESULTS.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from . import launch as _launch

KIB = 1024
SPARE = 8 * KIB  # shared memory left unused per block, at least

# (BLOCK_M, BLOCK_N level-1 tile, BLOCK_NP pooled tile, num_warps, num_stages)
AttentionTiles = tuple
# (BM strided query rows, BN strided key rows, num_warps, num_stages, passes): passes 1 = the
# one-pass importance kernel (a float32 scratch of per-(row, key block) log-sums), 2 = two-pass
EstimateTiles = tuple

INTERPRETER_ATTENTION = (64, 32, 32, 4, 1)
INTERPRETER_ESTIMATE = (32, 32, 4, 1, 1)


class UnsupportedGPU(RuntimeError):
    """The PSA Triton kernels cannot run on this GPU / dtype (the caller falls back)."""


@dataclass(frozen=True)
class TileSet:
    name: str
    min_arch: int  # compute capability x10
    min_shared: int  # bytes of shared memory per block (opt-in maximum) the set was checked for
    attention: AttentionTiles  # the PSA attention kernel (levels 1/2/4/8), plain loads
    dense: AttentionTiles  # the same kernel with every block at level 1, plain loads
    estimate: EstimateTiles  # the importance-estimate kernel
    attention_tma: AttentionTiles | None = None  # attention and dense with TMA loads (Hopper, 9.x)


# Largest first. Shared memory a block needs (bf16 = fp16, head size 128), compiled by
# Triton 3.9 (tests/test_gpu_targets.py prints them): see each comment.
TILE_SETS = (
    # 9.0 (H100/H200/GH200), 10.0 (B200/GB200): 227 KiB per block. 9.x runs the TMA kernel
    # (triton_attention's auto rule) with the H200-tuned 64x64 tiles, 208 KiB. The plain kernel
    # (where TMA cannot be: a non-contiguous input, 10.0) takes the same tiles, 208 KiB: its
    # 128x128 tiles need 288 KiB since issue 13 (224 of 227 before). Estimate: the H200-tuned
    # one-pass kernel, 192 KiB.
    TileSet("datacenter Hopper/Blackwell", 90, 227 * KIB,
            attention=(64, 64, 64, 4, 3), dense=(64, 64, 64, 4, 3), estimate=(64, 128, 4, 4, 1),
            attention_tma=(64, 64, 64, 4, 3)),
    # 8.0 (A100/A800/A30), 8.7 (Orin): 163 KiB. 128x128 needs 160 KiB there: 128x64, 96 KiB.
    # Estimate one-pass, three stages: 96 KiB (four: 144).
    TileSet("datacenter Ampere", 80, 163 * KIB,
            attention=(128, 64, 64, 4, 2), dense=(128, 64, 64, 4, 2), estimate=(64, 128, 4, 3, 1)),
    # 8.6 (A10/A40/RTX 30), 8.9 (L4/L40S/RTX 40), 12.0 (RTX 50/RTX PRO): 99 KiB.
    # 64x64 tiles: 88 KiB (128x64: 96, too close). Estimate one-pass, two stages: 48 KiB.
    TileSet("99 KiB cards (Ampere/Ada/Blackwell workstation)", 80, 99 * KIB,
            attention=(64, 64, 64, 4, 2), dense=(64, 64, 64, 4, 2), estimate=(64, 128, 4, 2, 1)),
    # 7.5 (T4, RTX 20): 64 KiB, float16 only (no bfloat16 tensor cores). Attention 48 KiB,
    # estimate 32 KiB.
    TileSet("Turing", 75, 64 * KIB,
            attention=(64, 32, 16, 4, 1), dense=(64, 32, 16, 4, 1), estimate=(32, 64, 4, 2, 1)),
)

# The classes the tests compile for: compute capability x10 -> (shared memory per block, dtypes)
GPU_CLASSES = {
    75: (64 * KIB, ("float16",)),
    80: (163 * KIB, ("bfloat16", "float16")),
    86: (99 * KIB, ("bfloat16", "float16")),
    89: (99 * KIB, ("bfloat16", "float16")),
    90: (227 * KIB, ("bfloat16", "float16")),
    100: (227 * KIB, ("bfloat16", "float16")),
    120: (99 * KIB, ("bfloat16", "float16")),
}


def select(arch: int, max_shared: int, dtype: str = "bfloat16") -> TileSet:
    """The tile set for a GPU of compute capability ``arch`` (x10) and ``max_shared`` bytes of
    shared memory per block, for ``dtype``; :class:`UnsupportedGPU` when none fits."""
    arch, max_shared = int(arch), int(max_shared)
    if arch < 75:
        raise UnsupportedGPU(
            f"compute capability {arch // 10}.{arch % 10} is older than the PSA kernels support "
            "(7.5 and newer)")
    if dtype == "bfloat16" and arch < 80:
        raise UnsupportedGPU(
            f"bfloat16 needs compute capability 8.0 or newer, this GPU has {arch // 10}.{arch % 10}: "
            "run the model in float16 (--dtype float16)")
    for ts in TILE_SETS:
        if arch >= ts.min_arch and max_shared >= ts.min_shared:
            return ts
    raise UnsupportedGPU(
        f"the GPU offers {max_shared // KIB} KiB of shared memory per block; the smallest PSA tile set "
        f"needs a {TILE_SETS[-1].min_shared // KIB} KiB device")


@functools.lru_cache(maxsize=64)
def _for_device(device: int, dtype: str, driver_id: int) -> TileSet:
    props = _launch.device_properties(device)
    return select(props["arch"], props["max_shared_mem"], dtype)


def for_tensor(t) -> TileSet | None:
    """The tile set for tensor ``t``'s GPU and dtype; None in Triton's CPU interpreter."""
    if _launch.interpreting():
        return None
    device = _launch.device_index(t)
    drv = _launch.ensure_driver()
    return _for_device(device, _launch.dtype_name(t), id(drv))


def attention_tiles(t, dense: bool = False, tma: bool = False) -> AttentionTiles:
    """Tiles of the attention kernel for ``t``'s GPU; ``tma``: the kernel will use TMA loads."""
    ts = for_tensor(t)
    if ts is None:
        return INTERPRETER_ATTENTION
    if tma and ts.attention_tma is not None:
        return ts.attention_tma
    return ts.dense if dense else ts.attention


def estimate_tiles(t) -> EstimateTiles:
    ts = for_tensor(t)
    return INTERPRETER_ESTIMATE if ts is None else ts.estimate
