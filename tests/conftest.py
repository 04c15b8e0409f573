"""Shared pytest set-up: keep JAX on the CPU and quiet TensorFlow."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir private to this test session (the offline builders prepare into it)."""
    return str(tmp_path_factory.mktemp("tfds"))
