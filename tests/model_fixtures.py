"""The tiny checkpoint, made once per test session through the same tool users run."""
import pytest

from tools.make_tiny_checkpoint import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_qwen2_5_vl")))
