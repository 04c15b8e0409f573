"""CPU runtime settings: XLA flags are added without overriding the user's, and heap trimming is
safe to call. The heap tests need glibc (``libc.so.6``: ``mallopt``, ``malloc_trim``) and the
RSS test Linux's ``/proc``: elsewhere (macOS, musl) they are skipped with that reason, and the
functions are checked to do nothing rather than fail."""

import ctypes
import os
import subprocess
import sys

import pytest

from diffusion import cpu_runtime


def _has_glibc() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")
    except OSError:
        return False


needs_glibc = pytest.mark.skipif(
    not _has_glibc(), reason=f"needs Linux with glibc (libc.so.6), not {sys.platform}"
)
needs_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="needs Linux's /proc/self/status (VmRSS)"
)


def test_without_glibc_the_heap_functions_do_nothing(monkeypatch):
    """On macOS or musl there is no ``libc.so.6``: the functions report False, never raise."""

    def no_libc(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(cpu_runtime.ctypes, "CDLL", no_libc)
    monkeypatch.setenv(cpu_runtime.KEEP_FREED_MEMORY_ENV, "1")
    assert cpu_runtime.release_free_heap() is False
    assert cpu_runtime.keep_freed_memory(force=True) is False


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


@pytest.mark.slow
@needs_glibc
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
import ctypes, resource
from diffusion import cpu_runtime
print("keep", cpu_runtime.keep_freed_memory())
import jax
print("async", jax.config.read("jax_cpu_enable_async_dispatch"))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 * 1024 * 1024  # a block as large as XLA's per-execution buffers (mmap-sized by default)
for i in range(4):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)  # touch every page, as a computation writing its buffer does
    libc.free(p)
    print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _faults_per_call(env_extra):
    env = {k: v for k, v in os.environ.items() if k != cpu_runtime.KEEP_FREED_MEMORY_ENV}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_CODE],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    keep = [ln.split()[1] for ln in lines if ln.startswith("keep ")][0] == "True"
    is_async = [ln.split()[1] for ln in lines if ln.startswith("async ")][0] == "True"
    return keep, [int(ln.split()[1]) for ln in lines if ln.startswith("faults ")], is_async


@pytest.mark.slow
@needs_glibc
def test_keep_freed_memory_is_opt_in_and_stops_refaulting_large_blocks():
    """XLA CPU's per-execution buffers are large blocks, which glibc maps afresh for every
    allocation and unmaps on free: every train step faulted its ~3 GB working set back in
    (~820k faults, ~2 s of kernel time per batch-32 CIFAR10 step). With glibc's settings (the
    variable unset, or ``0``) a 256 MiB block written, freed and allocated again faults all its
    65,536 pages each time; with ``DDPM_KEEP_FREED_MEMORY=1`` or ``sync`` the block's
    pages are reused after the first time."""
    pages = 256 * 1024 * 1024 // 4096
    env = cpu_runtime.KEEP_FREED_MEMORY_ENV
    for env_extra in ({}, {env: "0"}):
        keep, faults, is_async = _faults_per_call(env_extra)
        assert not keep and is_async, env_extra
        assert min(faults) >= 0.9 * pages, (env_extra, faults)
    for mode in ("1", "sync"):  # one shared heap, or the main thread's heap + synchronous calls
        keep, faults, is_async = _faults_per_call({env: mode})
        assert keep and is_async == (mode == "1"), (mode, is_async)
        assert faults[0] >= 0.9 * pages, faults  # the first time the pages are new
        assert max(faults[1:]) < 0.01 * pages, (mode, faults)


def test_an_unknown_mode_is_an_error_that_names_the_variable(tmp_path):
    """A typo (``Sync``) must not silently train with glibc's defaults: the mode resolver
    raises, and launch.py exits with status 2 and the message before JAX starts (before this
    check any value but ``1``/``sync`` was ignored without a word)."""
    env = cpu_runtime.KEEP_FREED_MEMORY_ENV
    assert cpu_runtime.keep_freed_memory_mode({}) == "0"
    assert cpu_runtime.keep_freed_memory_mode({env: " "}) == "0"  # empty = unset
    assert cpu_runtime.keep_freed_memory_mode({env: "sync"}) == "sync"
    # launch.py --mode train and the benchmarks default to sync; a set variable still wins
    assert cpu_runtime.keep_freed_memory_mode({}, default="sync") == "sync"
    assert cpu_runtime.keep_freed_memory_mode({env: "0"}, default="sync") == "0"
    with pytest.raises(ValueError, match="default='Sync'"):
        cpu_runtime.keep_freed_memory_mode({}, default="Sync")
    with pytest.raises(ValueError, match=f"{env}='Sync' is not one of 0, 1, sync"):
        cpu_runtime.keep_freed_memory_mode({env: "Sync"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "launch.py"),
            "--config",
            os.path.join(root, "experiments", "tiny.py"),
            "--workdir",
            str(tmp_path / "never-created"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, env: "Sync"},
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"error: {env}='Sync' is not one of 0, 1, sync" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "never-created").exists()


_CACHES_CODE = """
import gc
import numpy as np
from diffusion import cpu_runtime
import jax, jax.numpy as jnp

def rss_mib():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024

def make():  # a program whose executable holds a 64 MiB constant; the array itself is dropped
    c = np.random.default_rng(0).standard_normal(16 * 2**20).astype(np.float32)
    expect = float(c.astype(np.float64).sum())
    return jax.jit(lambda s: (s * c).sum()), expect

f, expect = make()
first = float(f(jnp.float32(1.0)))
gc.collect(); cpu_runtime.release_free_heap()
before = rss_mib()
assert cpu_runtime.release_compile_caches()
after = rss_mib()
again = float(f(jnp.float32(1.0)))  # still callable: recompiles
print(before, after, first, again, expect)
"""


@pytest.mark.slow
@needs_glibc
@needs_proc
def test_release_compile_caches_frees_cached_programs_and_keeps_functions_usable():
    """A cached executable holds its own copies of a program's constants: dropping JAX's caches
    gives at least the 64 MiB constant back, and the function still computes the same value."""
    out = subprocess.run(
        [sys.executable, "-c", _CACHES_CODE], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, first, again, expect = map(float, out.stdout.split()[-5:])
    assert before - after >= 64, (before, after)
    assert first == again
    assert abs(first - expect) <= 1e-4 * abs(expect) + 1.0


_INLINE_CODE = """
import numpy as np
from diffusion import cpu_runtime, parallel
print("keep", cpu_runtime.keep_freed_memory())
import jax, jax.numpy as jnp
mesh = parallel.make_mesh()
step = jax.jit(lambda x: jnp.tanh(x).sum())
rng = np.random.default_rng(0)
n = 32 * 32 * 32 * 3  # a batch-32 CIFAR10 batch: 384 KiB
queued = 0
for i in range(100):
    raw = np.empty(n + 16, np.float32)
    off = (-(raw.ctypes.data // 4) % 16) + 1  # 4 bytes past a 64-byte boundary: XLA must copy
    x = raw[off:off + n].reshape(32, 32, 32, 3)
    x[...] = rng.standard_normal(x.shape, dtype=np.float32)
    out = step(parallel.global_batch_from_local({"image": x}, mesh)["image"])
    queued += not out.is_ready()  # returned before it ran: queued for a pool thread
    out.block_until_ready()
print("queued", queued)
"""


@needs_glibc
def test_synchronous_dispatch_runs_the_step_inline_on_a_fresh_batch():
    """With ``DDPM_KEEP_FREED_MEMORY=sync`` every call must run on the calling thread (its
    heap, not a fresh mmap per call). XLA copies an unaligned host batch >= 100 KB on a worker
    thread; before `parallel.global_batch_from_local` waited for that copy, a step called right
    after it was queued for a pool thread instead whenever the copy had not finished (47 of 100
    calls here; in launch.py's loop one CIFAR10 b32 step in ~14, mapping 2.2 GB outside the
    heap)."""
    env = {**os.environ, cpu_runtime.KEEP_FREED_MEMORY_ENV: "sync"}
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(
        [sys.executable, "-c", _INLINE_CODE], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.split("\n")
    assert "keep True" in lines, p.stdout
    assert "queued 0" in lines, p.stdout
