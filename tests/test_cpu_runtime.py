"""CPU runtime settings: XLA flags are added without overriding the user's, and heap trimming is
safe to call."""

import subprocess
import sys

from diffusion import cpu_runtime


def test_flags_are_appended_and_user_values_win():
    env = {}
    out = cpu_runtime.apply_xla_cpu_flags(env, force=True)
    assert out.split() == list(cpu_runtime.XLA_CPU_FLAGS)
    env = {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4 "
        "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    }
    out = cpu_runtime.apply_xla_cpu_flags(env, force=True)
    assert out.split() == [
        "--xla_force_host_platform_device_count=4",
        "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    ] + [f for f in cpu_runtime.XLA_CPU_FLAGS if "concurrency" not in f]
    assert cpu_runtime.apply_xla_cpu_flags(dict(env), force=True) == out  # idempotent


def test_jax_accepts_the_flags_and_trimming_is_harmless():
    """A fresh process with the flags set starts the CPU backend and computes (an unknown flag
    would abort it), then trims its heap and computes again."""
    code = (
        "from diffusion import cpu_runtime; cpu_runtime.apply_xla_cpu_flags(force=True);"
        "import jax, jax.numpy as jnp; x = jnp.arange(4.0);"
        "assert float((x @ x)) == 14.0; assert cpu_runtime.release_free_heap();"
        "assert float(jnp.sum(x)) == 6.0; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


_FAULTS_CODE = """
import resource
from diffusion import cpu_runtime
print("keep", cpu_runtime.keep_freed_memory(force=True))
import jax, jax.numpy as jnp
x = jnp.ones((64, 1024, 1024), jnp.float32)  # 256 MiB: XLA allocates the sort's buffers per call
f = jax.jit(lambda x: jnp.sort(x, axis=0)[::-1] * 2.0)
for i in range(9):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _faults_per_call(env_extra):
    import os

    env = dict(os.environ, **env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_CODE], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    keep = [ln.split()[1] for ln in lines if ln.startswith("keep ")][0] == "True"
    return keep, [int(ln.split()[1]) for ln in lines if ln.startswith("faults ")]


def test_keep_freed_memory_stops_per_call_page_faults():
    """The bug: XLA CPU's per-execution buffers came from fresh mmaps, so every call of a
    jitted function faulted its whole working set in again (the CIFAR10 train step at batch 32:
    ~820k faults, ~2 s of kernel time per step). With `keep_freed_memory` the heap keeps the
    pages and repeated calls stop faulting; with it disabled (glibc's defaults) every call
    faults at least the 256 MiB output's 65,536 pages."""
    pages = 256 * 1024 * 1024 // 4096
    keep, faults = _faults_per_call({})
    assert keep
    assert max(faults[-3:]) < 0.05 * pages, faults
    keep, faults = _faults_per_call({cpu_runtime.KEEP_FREED_MEMORY_ENV: "0"})
    assert not keep
    assert min(faults[-3:]) >= pages, faults
