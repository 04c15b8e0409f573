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
