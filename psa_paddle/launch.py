"""How a Triton launch finds the device and the current stream of the host framework.

This is the only module that knows about it. The kernels in ``triton_attention`` and
``triton_estimate`` never call ``kernel[grid](...)`` directly; they call :func:`launch`, which

* on a GPU, reads the device index and the raw ``cudaStream_t`` of the framework that owns the
  tensors (Paddle: ``paddle.device.current_stream(place)``; PyTorch, used by the GPU bench:
  ``torch.cuda.current_stream``), and makes Triton's ``JITFunction.run`` use exactly those two
  values for this one launch. Triton asks ``driver.active.get_current_device()`` and
  ``driver.active.get_current_stream(device)`` on every launch; in a process without PyTorch its
  CUDA driver answers with the device's *default* stream, while Paddle runs its kernels on its
  own current stream. We therefore pin both answers for the duration of the launch
  (:func:`pinned_launch_target`), then restore whatever the driver had.
* in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests) launches directly: there is no
  stream.

Before the first launch it creates Triton's driver (:func:`ensure_driver`): Triton >= 3.8's
CUDA driver needs no framework; older ones read ``torch.cuda`` while they are created, and get
Paddle's ``torch`` proxy for that moment only, so no ``torch`` module stays behind in
``sys.modules``. Driver failures (no libcuda, no C compiler) surface here, at the first launch,
where psa.py's fail-over catches them.

It also holds the small host-array helpers the wrappers need (allocate on the tensor's device,
strides, contiguity) so that the kernels' modules never import a framework, and
:func:`install_interpreter_shim`, which lets the interpreter take Paddle CPU tensors. The shim is
only ever applied by the caller (tests), never at import.

The product never imports ``torch``: PyTorch tensors are only recognised through
``sys.modules`` (they can only exist if the caller imported torch).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

__all__ = [
    "device_capability",
    "tma_ready",
    "tensor_descriptor",
    "interpreting",
    "prepare_triton",
    "ensure_driver",
    "device_properties",
    "device_and_stream",
    "raw_stream_handle",
    "pinned_launch_target",
    "launch",
    "install_interpreter_shim",
    "framework_of",
    "empty",
    "zeros",
    "full",
    "strides",
    "to_device",
    "device_key",
    "ensure_last_dim_contiguous",
]

_PIN_LOCK = threading.RLock()
_MISSING = object()


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prepare_triton() -> None:
    """Kept for the kernel modules, which call it before ``import triton``: nothing to do there.

    ``import triton`` needs no framework. What does is Triton's *driver*, created lazily at the
    first launch; :func:`ensure_driver` creates it the product's way. (This used to switch on
    ``paddle.enable_compat(scope={"triton"})`` for the whole process, which left Paddle's proxy
    registered as ``torch`` in ``sys.modules`` once the driver was created.)
    """


def _torch_free_cuda_driver(nvidia_backend) -> bool:
    """Triton >= 3.8's CUDA driver runs without PyTorch (it then answers the default stream,
    which :func:`launch` overrides with the framework's current stream anyway)."""
    return hasattr(nvidia_backend.driver, "_get_current_stream")


@contextlib.contextmanager
def _paddle_torch_proxy():
    """Paddle's ``torch`` proxy for imports made inside Triton, for the duration of the block
    only: afterwards no proxy module stays in ``sys.modules`` (a user's later ``import torch``
    gets PyTorch, or fails, as without us)."""
    import paddle

    guard = getattr(getattr(paddle, "compat", None), "use_torch_proxy_guard", None)
    if guard is not None:
        with guard(scope={"triton"}, silent=True):
            yield
        return
    enable = getattr(paddle, "enable_compat", None)
    if enable is None:
        yield  # no compat layer: Triton's own error (it wants torch) will say so
        return
    before = {n for n in sys.modules if n == "torch" or n.startswith("torch.")}
    enable(scope={"triton"}, silent=True)
    try:
        yield
    finally:
        disable = getattr(paddle, "disable_compat", None)
        if disable is not None:
            disable()
        for n in [n for n in sys.modules if (n == "torch" or n.startswith("torch.")) and n not in before]:
            del sys.modules[n]


def ensure_driver():
    """Create Triton's active driver now (idempotent) and return it; raises what Triton raises
    (no libcuda / no GPU: RuntimeError, no C compiler: RuntimeError, ...).

    * PyTorch already imported by the user, or Triton >= 3.8: the NVIDIA driver is created
      directly. Going through Triton's own selection would run its AMD backend check, which
      executes ``import torch`` (importing PyTorch if it is installed, or Paddle's proxy).
    * Triton < 3.8 without PyTorch: its CUDA driver needs ``torch.cuda``; it gets Paddle's
      proxy for the creation only (:func:`_paddle_torch_proxy`). The driver keeps the few
      functions it took from it; the device and stream are pinned per launch anyway.
    """
    from triton.runtime import driver as _cfg

    current = getattr(_cfg, "_active", None)
    if current is not None:
        return current
    if not hasattr(_cfg, "set_active"):  # a Triton whose driver registry we do not know
        with _paddle_torch_proxy() if "torch" not in sys.modules else contextlib.nullcontext():
            return _cfg.active
    from triton.backends import backends

    nvidia = backends.get("nvidia")
    if nvidia is not None and ("torch" in sys.modules or _torch_free_cuda_driver(nvidia)):
        if nvidia.driver.is_active():
            drv = nvidia.driver()
            _cfg.set_active(drv)
            if getattr(_cfg, "_default", _MISSING) is None:
                _cfg._default = drv
            return drv
        return _cfg.active  # let Triton raise its own "0 active drivers" error
    with _paddle_torch_proxy():
        return _cfg.active


def device_properties(device: int) -> dict:
    """Triton's view of a GPU: ``{"arch": 90, "max_shared_mem": bytes, ...}``."""
    drv = ensure_driver()
    props = dict(drv.utils.get_device_properties(device))
    try:
        if int(drv.get_current_device()) == int(device):
            props["arch"] = int(drv.get_current_target().arch)
        else:
            major, minor = drv.get_device_capability(device)
            props["arch"] = int(major) * 10 + int(minor)
    except AttributeError:
        props["arch"] = int(drv.get_current_target().arch)
    return props


# --------------------------------------------------------------------------------------------
# framework detection and host-array helpers
# --------------------------------------------------------------------------------------------

def framework_of(t) -> str:
    """'torch' or 'paddle' for a tensor object."""
    mod = type(t).__module__.split(".")[0]
    if mod == "torch":
        return "torch"
    if mod == "paddle":
        return "paddle"
    raise TypeError(f"unsupported tensor type {type(t)!r}")


def _paddle():
    import paddle

    return paddle


def _torch():
    # reached only for torch tensors, so torch is already imported by the caller
    return sys.modules["torch"]


def _dtype(like, name):
    if name is None:
        return like.dtype
    if framework_of(like) == "torch":
        return getattr(_torch(), name)
    return name  # paddle accepts dtype strings


def empty(like, shape, dtype: str | None = None):
    """Uninitialised tensor on ``like``'s device (dtype name like 'int32', or like's dtype)."""
    shape = [int(s) for s in shape]
    if framework_of(like) == "torch":
        return _torch().empty(shape, dtype=_dtype(like, dtype), device=like.device)
    return _paddle().empty(shape, dtype=_dtype(like, dtype), device=like.place)


def zeros(like, shape, dtype: str | None = None):
    shape = [int(s) for s in shape]
    if framework_of(like) == "torch":
        return _torch().zeros(shape, dtype=_dtype(like, dtype), device=like.device)
    return _paddle().zeros(shape, dtype=_dtype(like, dtype), device=like.place)


def full(like, shape, value, dtype: str | None = None):
    shape = [int(s) for s in shape]
    if framework_of(like) == "torch":
        return _torch().full(shape, value, dtype=_dtype(like, dtype), device=like.device)
    return _paddle().full(shape, value, dtype=_dtype(like, dtype), device=like.place)


def to_device(like, array):
    """A host numpy array copied to ``like``'s device (a small, cached table; no device sync)."""
    if framework_of(like) == "torch":
        return _torch().as_tensor(array, device=like.device)
    return _paddle().to_tensor(array, place=like.place)


def device_key(t) -> str:
    return str(t.device) if framework_of(t) == "torch" else str(t.place)


def strides(t):
    """Element strides as a tuple of ints (both frameworks expose ``stride()``)."""
    return tuple(int(s) for s in t.stride())


def ensure_last_dim_contiguous(t):
    if t.shape[-1] != 1 and int(t.stride()[-1]) != 1:
        return t.contiguous()
    return t


def dtype_name(t) -> str:
    return str(t.dtype).split(".")[-1]


def is_gpu(t) -> bool:
    if framework_of(t) == "torch":
        return t.device.type == "cuda"
    return bool(t.place.is_gpu_place())


# --------------------------------------------------------------------------------------------
# device and stream
# --------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------- TMA (Hopper) helpers

_CC_CACHE: dict = {}


def device_capability(t):
    """(major, minor) compute capability of a GPU tensor's device, or None (CPU, or unknown)."""
    try:
        if framework_of(t) == "torch":
            dev = t.device
            if dev.type != "cuda":
                return None
            key = ("torch", dev.index)
            if key not in _CC_CACHE:
                _CC_CACHE[key] = tuple(_torch().cuda.get_device_capability(dev))
        else:
            place = t.place
            if not place.is_gpu_place():
                return None
            idx = place.gpu_device_id()
            key = ("paddle", idx)
            if key not in _CC_CACHE:
                _CC_CACHE[key] = tuple(_paddle().device.cuda.get_device_capability(idx))
        return _CC_CACHE[key]
    except Exception:
        return None


def _descriptor_class():
    try:  # Triton >= 3.3
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception:  # older Triton: the kernels' plain path only
        return None
    return TensorDescriptor


def tma_ready(*ts) -> bool:
    """Tensor descriptors exist in this Triton, and every tensor is a contiguous [B, H, L, D] on a
    16-byte boundary (what they need)."""
    if _descriptor_class() is None:
        return False
    for t in ts:
        B, H, L, D = (int(s) for s in t.shape)
        if tuple(strides(t)) != (H * L * D, L * D, D, 1) or int(t.data_ptr()) % 16 or (D * 2) % 16:
            return False
    return True


class _DescDtype:
    """What TensorDescriptor and Triton's binder read off ``base.dtype`` (Paddle dtypes lack itemsize)."""

    def __init__(self, name, itemsize):
        self.name, self.itemsize, self.is_floating_point = name, itemsize, True

    def __str__(self):
        return "dtype." + self.name


class _DescBase:
    """A Paddle tensor as TensorDescriptor's base: its pointer and a dtype Triton understands."""

    def __init__(self, t):
        self._ptr = int(t.data_ptr())
        name = dtype_name(t)
        self.dtype = _DescDtype(name, 4 if name == "float32" else 2)

    def data_ptr(self):
        return self._ptr


def tensor_descriptor(t, shape, strides_, block):
    """Triton's host TensorDescriptor over tensor ``t`` (either framework)."""
    base = t if framework_of(t) == "torch" else _DescBase(t)
    return _descriptor_class()(base, shape, strides_, block)


def raw_stream_handle(stream) -> int:
    """The ``cudaStream_t`` (as int) of a framework stream object.

    Accepts a PyTorch ``torch.cuda.Stream`` (``.cuda_stream``), a Paddle
    ``paddle.device.Stream`` (``.stream_base.cuda_stream`` / ``.raw_stream``), a bare Paddle
    ``core.CUDAStream`` (``.cuda_stream``) or an int.
    """
    if isinstance(stream, int):
        return stream
    for owner in (stream, getattr(stream, "stream_base", None)):
        if owner is None:
            continue
        for attr in ("cuda_stream", "raw_stream"):
            h = getattr(owner, attr, None)
            if h is not None:
                return int(h)
    cs = getattr(stream, "__cuda_stream__", None)
    if cs is not None:
        return int(cs()[1])
    raise TypeError(f"cannot read a raw CUDA stream handle from {stream!r}")


def device_index(t) -> int:
    """The GPU index of tensor ``t`` (0 for a CPU tensor: compile checks on the CPU)."""
    if not is_gpu(t):
        return 0
    if framework_of(t) == "torch":
        return int(t.device.index if t.device.index is not None else _torch().cuda.current_device())
    return int(t.place.gpu_device_id())


def device_and_stream(t) -> tuple[int, int]:
    """(device index, raw current stream) of the framework that owns tensor ``t``."""
    if framework_of(t) == "torch":
        torch = _torch()
        idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return int(idx), int(torch.cuda.current_stream(idx).cuda_stream)
    paddle = _paddle()
    idx = int(t.place.gpu_device_id())
    return idx, raw_stream_handle(paddle.device.current_stream(paddle.CUDAPlace(idx)))


@contextlib.contextmanager
def pinned_launch_target(drv, device: int, stream: int):
    """Make ``drv.get_current_device()`` / ``drv.get_current_stream(d)`` answer (device, stream).

    ``drv`` is Triton's active driver (``triton.runtime.driver.active``), whose two getters
    are plain attributes (set in its ``__init__``) that ``JITFunction.run`` calls at every
    launch. If the real current device differs, it is switched for the launch (module loading
    goes to the current context) and switched back.
    """
    with _PIN_LOCK:
        saved = {n: drv.__dict__.get(n, _MISSING) for n in ("get_current_device", "get_current_stream")}
        real_dev = drv.get_current_device()
        switched = int(real_dev) != int(device)
        if switched:
            drv.set_current_device(device)
        drv.get_current_device = lambda: device
        drv.get_current_stream = lambda idx=None: stream
        try:
            yield
        finally:
            for n, val in saved.items():
                if val is _MISSING:
                    drv.__dict__.pop(n, None)
                else:
                    setattr(drv, n, val)
            if switched:
                drv.set_current_device(real_dev)


def launch(kernel, grid, *args, _driver=None, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on the device and current stream of the first tensor arg."""
    if interpreting():
        return kernel[grid](*args, **kwargs)
    tensor = next((a for a in args if hasattr(a, "data_ptr") and hasattr(a, "dtype")), None)
    if tensor is None:
        raise ValueError("launch needs at least one tensor argument")
    device, stream = device_and_stream(tensor)
    drv = _driver if _driver is not None else ensure_driver()
    with pinned_launch_target(drv, device, stream):
        return kernel[grid](*args, **kwargs)


# --------------------------------------------------------------------------------------------
# interpreter shim (tests only)
# --------------------------------------------------------------------------------------------

def install_interpreter_shim() -> None:
    """Let ``TRITON_INTERPRET=1`` kernels take Paddle CPU tensors.

    The interpreter copies every tensor argument to a host copy through PyTorch's storage API
    (``untyped_storage``), which Paddle tensors lack. Paddle CPU tensors already live on the
    host, so for launches that carry a Paddle tensor we skip the copy in and the copy back.
    Launches with other tensors keep the interpreter's own behaviour. Idempotent.
    """
    from triton.runtime import interpreter as _interp

    ge = _interp.GridExecutor
    if getattr(ge, "_psa_shim", False):
        return
    orig_init, orig_restore = ge._init_args_hst, ge._restore_args_dev

    def _has_paddle(args, kwargs):
        for a in list(args) + list(kwargs.values()):
            if type(a).__module__.split(".")[0] == "paddle":
                return True
        return False

    def _init_args_hst(self, args_dev, kwargs):
        if _has_paddle(args_dev, kwargs):
            return list(args_dev), dict(kwargs)
        return orig_init(self, args_dev, kwargs)

    def _restore_args_dev(self, args_dev, args_hst, kwargs, kwargs_hst):
        if _has_paddle(args_dev, kwargs):
            return None
        return orig_restore(self, args_dev, args_hst, kwargs, kwargs_hst)

    ge._init_args_hst = _init_args_hst
    ge._restore_args_dev = _restore_args_dev
    ge._psa_shim = True
