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


# The fast tier (`make test-fast`, `pytest -m "not slow"`) is the edit loop: maths, models,
# metrics, configs, layering. Modules that train, evaluate, convert, relaunch or talk to the
# storage emulator are integration tests: every test in them counts as slow. Individual slow
# tests elsewhere carry @pytest.mark.slow. `make test` (CI) runs both tiers.
INTEGRATION_MODULES = {
    "test_train.py",
    "test_train_step.py",
    "test_evaluate.py",
    "test_reliability.py",
    "test_resume.py",
    "test_convert.py",
    "test_gcs_run.py",
    "test_reproduce.py",
    "test_io.py",
    "test_bf16.py",
    "test_cpu_runtime.py",
    "test_step_profile.py",
    "test_data.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.slow)
