import numpy as np
import pytest

from minivae.backend import cupy_available

_GPU = cupy_available()
GPU_REASON = "CuPy is not installed or cupy.is_available() is False (no usable CUDA GPU)"


def pytest_collection_modifyitems(config, items):
    if _GPU:
        return
    skip = pytest.mark.skip(reason=GPU_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def backends():
    """Parametrize over backends: numpy always, cupy marked gpu (skipped without a GPU)."""
    return [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
