"""Shared pytest set-up: keep JAX on the CPU and quiet TensorFlow."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# One persistent XLA cache per test session (inherited by worker subprocesses): relaunches in
# the resume / fault-injection tests reuse compiled binaries instead of recompiling.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_xla_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir private to this test session (the offline builders prepare into it)."""
    return str(tmp_path_factory.mktemp("tfds"))


# The fast tier (`make test-fast`, `pytest -m "not slow"`) is the edit loop. A test that trains,
# evaluates, relaunches a process, compiles a full-size model or starts the storage emulator
# carries @pytest.mark.slow (one by one: a cheap test in the same module stays fast; measured
# with --durations=0, under about 2 s is fast). `make test` (CI) runs both tiers.


@pytest.fixture()
def tiny_config(data_dir):
    """The one tiny training config of the tests (tests/train_worker.py's `small_config`: 16x16
    mnist5k, a two-level U-Net; 10 steps, checkpoints at 5 and 10), fresh for each test. Tests
    that train start from it, so the compiled step and init hit the persistent XLA cache."""
    from train_worker import small_config

    c = small_config(data_dir, 10)
    c.training.checkpoint_every = 5
    c.training.keep_every = 5
    return c
