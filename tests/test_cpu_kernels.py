"""How the C++ CPU kernels are built (diffusion/models/cpu_kernels.py), none of it needing a real
compiler: a failed build is logged once with the compiler's error, remembered in a marker file
per cache key and not retried by a later process; a compiler that rejects ``-march=native`` is
retried without it; the pure-JAX fallback computes what XLA computes; the one status line; and
the renamed environment variables (old names still work, with one warning naming the new one).
"""

import logging
import os
import stat
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import cpu_runtime
from diffusion.models import conv, cpu_kernels, group_norm

FAKE_CXX = """#!/bin/sh
echo "$@" >> "{calls}"
{body}
"""


def _fake_compiler(tmp_path: Path, body: str) -> tuple:
    """A compiler script that records each call's arguments (one line each) and runs ``body``."""
    calls = tmp_path / "calls.txt"
    script = tmp_path / "fake-c++"
    script.write_text(FAKE_CXX.format(calls=calls, body=body))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), calls


def _calls(calls: Path) -> list:
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh process's view of the kernels: no load attempted yet, an empty cache, no switch."""
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("DDPM_CPU_KERNELS", "DDPM_JAX_WINOGRAD_FFI", "DDPM_JAX_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "cache" / "cpu_kernels"


def test_a_failed_build_is_logged_once_remembered_and_not_retried(
    fresh, tmp_path, monkeypatch, caplog
):
    cxx, calls = _fake_compiler(tmp_path, 'echo "kernels.cc:1: error: boom" >&2; exit 1')
    monkeypatch.setenv("CXX", cxx)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert not cpu_kernels.available()
        assert not cpu_kernels.available()  # asked again in the same process: no new attempt
    assert len(_calls(calls)) == 1
    reason = cpu_kernels.unavailable_reason()
    assert "build failed" in reason and "error: boom" in reason and "status 1" in reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "error: boom" in warnings[0].getMessage()
    markers = list(fresh.glob("cpu_kernels-*.failed"))
    assert len(markers) == 1 and "error: boom" in markers[0].read_text()
    assert not list(fresh.glob("*.so")) and not list(fresh.glob("tmp*"))  # nothing half-built

    monkeypatch.setattr(cpu_kernels, "_state", {})  # a later process, same key
    assert not cpu_kernels.available()
    assert len(_calls(calls)) == 1  # the compiler was not run again
    assert "not retried" in cpu_kernels.unavailable_reason()
    assert "error: boom" in cpu_kernels.unavailable_reason()

    markers[0].unlink()  # deleting the marker retries
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert not cpu_kernels.available()
    assert len(_calls(calls)) == 2


def test_another_compiler_is_another_key(fresh, tmp_path, monkeypatch):
    cxx, calls = _fake_compiler(tmp_path, 'echo "error: boom" >&2; exit 1')
    monkeypatch.setenv("CXX", cxx)
    assert not cpu_kernels.available()
    other = tmp_path / "other"
    other.mkdir()
    cxx2, calls2 = _fake_compiler(other, 'echo "error: again" >&2; exit 1')
    monkeypatch.setenv("CXX", cxx2)
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert not cpu_kernels.available()
    assert len(_calls(calls)) == 1 and len(_calls(calls2)) == 1
    assert len(list(fresh.glob("cpu_kernels-*.failed"))) == 2


def test_march_native_rejected_is_retried_without_it(fresh, tmp_path, monkeypatch):
    # Like Apple clang on arm64: -march=native is refused; without it the "build" succeeds (an
    # empty file, which then fails to load: the point here is the retry and what is cached).
    body = """for a in "$@"; do
  case "$a" in -march=native) echo "clang: error: unsupported argument 'native' to option '-march='" >&2; exit 1;; esac
done
while [ "$#" -gt 1 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
: > "$out"; exit 0"""
    cxx, calls = _fake_compiler(tmp_path, body)
    monkeypatch.setenv("CXX", cxx)
    assert not cpu_kernels.available()  # the empty library cannot load
    made = _calls(calls)
    assert len(made) == 2
    assert "-march=native" in made[0].split() and "-march=native" not in made[1].split()
    assert len(list(fresh.glob("cpu_kernels-*.so"))) == 1
    assert not list(fresh.glob("*.failed"))


def test_no_compiler_at_all(fresh, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert not cpu_kernels.available()
    assert "No such file" in cpu_kernels.unavailable_reason() or "not found" in (
        cpu_kernels.unavailable_reason()
    )


@pytest.mark.parametrize("name", ["DDPM_CPU_KERNELS", "DDPM_JAX_WINOGRAD_FFI"])
def test_the_off_switch(fresh, tmp_path, monkeypatch, name):
    cxx, calls = _fake_compiler(tmp_path, "exit 1")
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv(name, "0")
    monkeypatch.setattr(cpu_runtime, "_warned", set())
    assert not cpu_kernels.available()
    assert cpu_kernels.unavailable_reason() == "turned off by DDPM_CPU_KERNELS=0"
    assert _calls(calls) == []
    assert "because turned off by DDPM_CPU_KERNELS=0" in cpu_kernels.status_line()


def test_status_line_names_what_runs_and_why(fresh, tmp_path, monkeypatch, caplog):
    assert "XLA's convolutions and GroupNorm (compute dtype bfloat16" in (
        cpu_kernels.status_line("bfloat16")
    )
    cxx, _ = _fake_compiler(tmp_path, 'echo "x.cc:3: error: boom" >&2; exit 1')
    monkeypatch.setenv("CXX", cxx)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        line = cpu_kernels.status_line("float32", "auto")
    assert "\n" not in line
    assert line.startswith(cpu_kernels.FALLBACK) and "error: boom" in line
    assert not caplog.records  # the line carries the reason: no second message


def test_the_pure_jax_fallback_computes_what_xla_computes(fresh, monkeypatch):
    monkeypatch.setenv("DDPM_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 8, 16)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, 16, 8)).astype(np.float32))
    ref = np.asarray(conv.xla_conv(x, k))
    for m, tol in ((2, 2e-6), (4, 1e-5)):
        fn = jax.jit(lambda x, k, m=m: conv.winograd_conv(x, k, m))
        assert "ddpm_wino" not in fn.lower(x, k).as_text()  # no custom call in the program
        y = np.asarray(fn(x, k))
        assert np.abs(y - ref).max() / np.abs(ref).max() < tol
    # GroupNorm: the fallback against a float64 NumPy GroupNorm.
    scale = jnp.asarray(rng.standard_normal(16).astype(np.float32))
    bias = jnp.asarray(rng.standard_normal(16).astype(np.float32))
    got = np.asarray(group_norm.group_norm(x, scale, bias, 4, 1e-6))
    x64 = np.asarray(x, np.float64).reshape(2, 9, 8, 4, 4)
    mean = x64.mean(axis=(1, 2, 4), keepdims=True)
    var = x64.var(axis=(1, 2, 4), keepdims=True)
    want = ((x64 - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * np.asarray(
        scale, np.float64
    ) + np.asarray(bias, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------------- renames
@pytest.mark.parametrize("old, new", sorted(cpu_runtime.RENAMED_ENV.items()))
def test_an_old_variable_name_works_with_one_warning_naming_the_new(old, new, monkeypatch, caplog):
    monkeypatch.setattr(cpu_runtime, "_warned", set())
    env = {old: "0"}
    with caplog.at_level(logging.WARNING, logger=cpu_runtime.__name__):
        assert cpu_runtime.getenv(new, environ=env) == "0"
        assert cpu_runtime.getenv(new, environ=env) == "0"
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and old in msgs[0] and f"set {new}=0" in msgs[0]
    assert cpu_runtime.getenv(new, environ={old: "0", new: "1"}) == "1"  # the new name wins
    assert cpu_runtime.getenv(new, "d", environ={}) == "d"


def test_the_renamed_variables_reach_their_readers(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "_warned", set())
    assert cpu_runtime.keep_freed_memory_mode({"DIFFUSION_KEEP_FREED_MEMORY": "sync"}) == "sync"
    assert cpu_runtime.keep_freed_memory_mode({"DDPM_KEEP_FREED_MEMORY": "1"}) == "1"
    assert cpu_runtime.cache_dir({"DDPM_JAX_CACHE": str(tmp_path)}) == tmp_path
    assert cpu_runtime.cache_dir({"DDPM_CACHE_DIR": str(tmp_path / "a")}) == tmp_path / "a"
    assert cpu_runtime.cache_dir({}) == Path(os.path.expanduser("~")) / ".cache" / "ddpm_jax"
    from diffusion.metrics.inception import weights as inception_weights

    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path))
    assert inception_weights._cache_dir() == str(tmp_path)  # one cache dir for weights and kernels
