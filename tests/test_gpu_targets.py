"""Every PSA Triton kernel compiles for every GPU class and fits its shared memory (no GPU).

Triton's compiler needs no GPU: under a stand-in active driver that reports a target
(``GPUTarget("cuda", arch, 32)``) and its shared memory per block, ``kernel.warmup(...)``
runs the real binder and compiler down to a cubin, whose ``metadata.shared`` is what one block
needs. The host wrappers run for real with Paddle CPU tensors (their argument logic and the
tile choice of psa_paddle/tiles.py are what is checked); only the launch is replaced by the
warm-up. One compile pass per (class, dtype), shared by the tests through a module fixture and
spread over two processes: about 2 minutes on two cores with an empty Triton cache.
"""
from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("compile checks need the real compiler, not the interpreter", allow_module_level=True)

import paddle  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402

from psa_paddle import AttentionConfig  # noqa: E402
from psa_paddle import launch as L  # noqa: E402
from psa_paddle import tiles as T  # noqa: E402

pytestmark = pytest.mark.slow

B, HQ, HKV, D = 1, 4, 2, 128  # head size of every Qwen2.5-VL language model
SEQ = 1024  # 8 blocks: every level path of the kernels is compiled
LONG_KB = 1024  # key blocks of a 131072-token prompt: the sort / LUT width (NP) of a long video


class _Utils:
    def __init__(self, shared):
        self.shared = shared

    def get_device_properties(self, device):
        return {"max_shared_mem": self.shared, "multiprocessor_count": 100, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}


class StandInDriver:
    """Answers like Triton's CUDA driver for a GPU of compute capability ``arch``."""

    def __init__(self, arch: int, shared: int):
        self.arch = arch
        self.device = 1000 + arch  # its own binder cache slot in every kernel
        self.utils = _Utils(shared)

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return self.device

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device):
        return divmod(self.arch, 10)


def _compile_all(arch: int, shared: int, dtype: str) -> list:
    """Run every host wrapper for this target; return [(kernel name, shared bytes, tiles)]."""
    import psa_paddle.triton_attention as ta
    import psa_paddle.triton_estimate as te

    seen = []

    def warmup_instead_of_launch(kernel, grid, *args, **kwargs):
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        seen.append((kernel.fn.__name__, int(compiled.metadata.shared),
                     {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BM", "BN", "USE_TMA", "num_warps", "num_stages")
                      if k in kwargs}))
        return compiled

    stand_in = StandInDriver(arch, shared)
    saved_active, saved_launch, saved_cc = triton_driver._active, L.launch, L.device_capability
    triton_driver.set_active(stand_in)
    L.launch = warmup_instead_of_launch
    L.device_capability = lambda t: divmod(arch, 10)  # the kernels' own TMA rule sees this target too
    T._for_device.cache_clear()
    try:
        paddle.seed(0)
        q = paddle.randn([B, HQ, SEQ, D]).astype(dtype)
        k = paddle.randn([B, HKV, SEQ, D]).astype(dtype)
        levels = paddle.ones([B, HQ, SEQ // 128, SEQ // 128], "int8")
        ta.pyramid_attention_triton(q, k, k, levels, 0, 0.088)
        ts = T.select(arch, shared, dtype)
        if ts.dense != ts.attention:  # the same kernel: only other tiles need their own check
            ta.dense_attention_triton(q, k, k, 0, 0.088)
        if ts.attention_tma is not None:  # the TMA kernel ran above (9.x); the plain one is its fallback
            ta.pyramid_attention_triton(q, k, k, levels, 0, 0.088, use_tma=False)
        for mode in ("energybound", "topk"):
            te.estimate_levels_triton(q, k, AttentionConfig(mask_mode=mode), 0)
        # the long-prompt widths of the per-row kernels (sort and LUT over 1024 key blocks)
        imp = paddle.rand([1, 1, 1, LONG_KB], "float32")
        te.levels_from_importance_triton(imp, None, (LONG_KB - 1) * 128, 128)
        ta.build_level_lut(paddle.ones([1, 1, 1, LONG_KB], "int8"), (LONG_KB - 1) * 128, 128)
    finally:
        L.launch, L.device_capability = saved_launch, saved_cc
        triton_driver._active = saved_active
        T._for_device.cache_clear()
        for mod in (ta, te):
            for kern in vars(mod).values():
                if hasattr(kern, "device_caches"):
                    kern.device_caches.pop(stand_in.device, None)
    return seen


CASES = [(arch, dtype) for arch, (_, dtypes) in sorted(T.GPU_CLASSES.items()) for dtype in dtypes]


def _timed_compile(case):
    arch, dtype = case
    t0 = time.perf_counter()
    seen = _compile_all(arch, T.GPU_CLASSES[arch][0], dtype)
    return case, seen, time.perf_counter() - t0


@pytest.fixture(scope="module")
def compiled():
    """Every case compiled once; in two worker processes (CI has two cores, Triton compiles on one)."""
    import concurrent.futures
    import multiprocessing

    out = {}
    workers = min(2, os.cpu_count() or 1)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = list(pool.map(_timed_compile, CASES))
    else:
        results = [_timed_compile(c) for c in CASES]
    for case, seen, secs in results:
        out[case] = seen
        out[(*case, "s")] = secs
    return out


@pytest.mark.parametrize("arch,dtype", CASES, ids=[f"sm{a}-{d}" for a, d in CASES])
def test_every_kernel_fits_with_room_to_spare(compiled, arch, dtype):
    shared = T.GPU_CLASSES[arch][0]
    seen = compiled[(arch, dtype)]
    names = {name for name, _, _ in seen}
    assert names >= {"_attn_kernel", "_pyramid_kernel", "_lut_kernel", "_cap_kernel", "_levels_kernel"}, names
    assert names & {"_importance_kernel", "_importance1_kernel"}, names
    report = ", ".join(f"{n}{' (TMA)' if t.get('USE_TMA') else ''} {s // 1024} KiB" for n, s, t in seen)
    print(f"sm_{arch} {dtype} ({shared // 1024} KiB, {compiled[(arch, dtype, 's')]:.0f} s): {report}")
    for name, need, tiles in seen:
        assert need + T.SPARE <= shared, (
            f"sm_{arch} {dtype}: {name} {tiles} needs {need} bytes of shared memory, the class has "
            f"{shared}: less than {T.SPARE} to spare")


def test_selection_per_class():
    """Each listed class gets the set written for it; unknown cards get what their memory allows."""
    assert T.select(90, 227 * 1024).name == T.select(100, 227 * 1024).name == T.TILE_SETS[0].name
    assert T.select(80, 163 * 1024).name == T.TILE_SETS[1].name
    for arch in (86, 89, 120):
        assert T.select(arch, 99 * 1024).name == T.TILE_SETS[2].name
    assert T.select(75, 64 * 1024, "float16").name == T.TILE_SETS[3].name
    assert T.select(87, 163 * 1024).name == T.TILE_SETS[1].name  # Jetson Orin
    assert T.select(121, 99 * 1024).name == T.TILE_SETS[2].name  # a 12.x card not listed
    with pytest.raises(T.UnsupportedGPU, match="float16"):
        T.select(75, 64 * 1024, "bfloat16")
    with pytest.raises(T.UnsupportedGPU, match="7.5"):
        T.select(70, 96 * 1024, "float16")
    with pytest.raises(T.UnsupportedGPU, match="shared memory"):
        T.select(86, 48 * 1024, "float16")
