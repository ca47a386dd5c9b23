"""launch.py: how Triton launches find the host framework's device and current stream (CPU).

No GPU here: a stand-in driver object (with Triton's two getters as plain attributes, as its
CUDA driver has them) and stand-in stream objects check the wiring; the Triton source check
guards the one contract we rely on (JITFunction.run asks driver.active for both at launch).
"""
from __future__ import annotations

import inspect
import types

import pytest

from psa_paddle import launch


class FakeDriver:
    """Like triton's CudaDriver: getters are instance attributes set in __init__."""

    def __init__(self, device=0, stream=0):
        self.current = device
        self.default_stream = stream
        self.get_current_device = lambda: self.current
        self.get_current_stream = lambda idx=None: self.default_stream
        self.set_calls = []

    def set_current_device(self, d):
        self.set_calls.append(d)
        self.current = d


class FakeKernel:
    """kernel[grid](*args) records what the driver answers at launch time, as JITFunction.run does."""

    def __init__(self, drv):
        self.drv = drv
        self.seen = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            dev = self.drv.get_current_device()
            self.seen.append((grid, dev, self.drv.get_current_stream(dev), args, kwargs))
            return "ran"
        return run


def test_pinned_launch_target_sets_and_restores():
    drv = FakeDriver(device=0, stream=0)
    orig_dev, orig_stream = drv.get_current_device, drv.get_current_stream
    with launch.pinned_launch_target(drv, 0, 0xBEEF):
        assert drv.get_current_device() == 0
        assert drv.get_current_stream(0) == 0xBEEF
    assert drv.get_current_device is orig_dev and drv.get_current_stream is orig_stream
    assert drv.get_current_stream(0) == 0 and drv.set_calls == []


def test_pinned_launch_target_switches_device_and_back():
    drv = FakeDriver(device=0)
    with launch.pinned_launch_target(drv, 2, 77):
        assert drv.current == 2 and drv.get_current_device() == 2 and drv.get_current_stream(2) == 77
    assert drv.set_calls == [2, 0] and drv.current == 0


def test_pinned_launch_target_restores_on_error():
    drv = FakeDriver()
    orig = drv.get_current_stream
    with pytest.raises(RuntimeError):
        with launch.pinned_launch_target(drv, 0, 5):
            raise RuntimeError("compile failed")
    assert drv.get_current_stream is orig


def test_pinned_launch_target_class_level_getters():
    """A driver whose getters are methods (no instance attribute) is left without leftovers."""
    class MethodDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, idx=None):
            return 0

        def set_current_device(self, d):
            pass

    drv = MethodDriver()
    with launch.pinned_launch_target(drv, 0, 9):
        assert drv.get_current_stream(0) == 9
    assert "get_current_stream" not in drv.__dict__ and drv.get_current_stream(0) == 0


def test_launch_uses_framework_stream(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    drv = FakeDriver(device=0, stream=0)
    kern = FakeKernel(drv)

    class T:  # any tensor-like argument
        dtype = "float32"

        def data_ptr(self):
            return 1234

    t = T()
    monkeypatch.setattr(launch, "device_and_stream", lambda x: (0, 0xC0FFEE) if x is t else (9, 9))
    assert launch.launch(kern, (3, 4), 7, t, BLOCK=64, _driver=drv) == "ran"
    grid, dev, stream, args, kwargs = kern.seen[0]
    assert (grid, dev, stream) == ((3, 4), 0, 0xC0FFEE)
    assert args == (7, t) and kwargs == {"BLOCK": 64}
    assert drv.get_current_stream(0) == 0  # restored


def test_launch_in_interpreter_skips_stream(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    drv = FakeDriver()
    kern = FakeKernel(drv)
    monkeypatch.setattr(launch, "device_and_stream", lambda x: pytest.fail("no stream in the interpreter"))
    assert launch.launch(kern, (1,), object(), _driver=drv) == "ran"


def test_raw_stream_handle_stand_ins():
    assert launch.raw_stream_handle(42) == 42
    torch_like = types.SimpleNamespace(cuda_stream=0x10)
    assert launch.raw_stream_handle(torch_like) == 0x10
    paddle_like = types.SimpleNamespace(stream_base=types.SimpleNamespace(cuda_stream=0x20))
    assert launch.raw_stream_handle(paddle_like) == 0x20
    raw_only = types.SimpleNamespace(stream_base=types.SimpleNamespace(raw_stream=0x30))
    assert launch.raw_stream_handle(raw_only) == 0x30

    class Proto:
        def __cuda_stream__(self):
            return (0, 0x40)

    assert launch.raw_stream_handle(Proto()) == 0x40
    with pytest.raises(TypeError):
        launch.raw_stream_handle(object())


def test_device_and_stream_paddle_stand_in(monkeypatch):
    paddle = pytest.importorskip("paddle")
    asked = []

    class Place:
        def gpu_device_id(self):
            return 1

    FakePaddleTensor = type("Tensor", (), {"__module__": "paddle", "place": Place()})
    stream = types.SimpleNamespace(stream_base=types.SimpleNamespace(cuda_stream=0xABC))
    monkeypatch.setattr(paddle, "CUDAPlace", lambda i: ("gpu", i), raising=False)
    monkeypatch.setattr(paddle.device, "current_stream", lambda place=None: asked.append(place) or stream)
    assert launch.device_and_stream(FakePaddleTensor()) == (1, 0xABC)
    assert asked == [("gpu", 1)]


def test_triton_run_reads_driver_getters():
    """The contract pinned_launch_target relies on, in the installed Triton."""
    jit = pytest.importorskip("triton.runtime.jit")
    src = inspect.getsource(jit.JITFunction.run)
    assert "driver.active.get_current_device()" in src
    assert "driver.active.get_current_stream(" in src


def test_framework_of_and_errors(monkeypatch):
    paddle = pytest.importorskip("paddle")
    assert launch.framework_of(paddle.zeros([1])) == "paddle"
    with pytest.raises(TypeError):
        launch.framework_of(object())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError):  # no tensor argument: no device to launch on
        launch.launch(FakeKernel(FakeDriver()), (1,), 3, _driver=FakeDriver())


def test_interpreter_shim_is_opt_in_and_idempotent():
    interp = pytest.importorskip("triton.runtime.interpreter")
    launch.install_interpreter_shim()
    first = interp.GridExecutor._init_args_hst
    launch.install_interpreter_shim()
    assert interp.GridExecutor._init_args_hst is first and interp.GridExecutor._psa_shim
