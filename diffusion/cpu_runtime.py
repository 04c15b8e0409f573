"""Host (CPU) runtime settings measured to help on CPU training: XLA CPU flags and giving freed
heap back to the OS. The flags are process-wide and must be set before JAX starts, so only entry
points apply them (launch.py, experiments/reproduce.py, benchmarks/); trimming the heap is
harmless anywhere (the training loop does it once, after the step has compiled).

Measured on 2 CPU cores, CIFAR10 U-Net train step at batch 32 (benchmarks/RESULTS.md):
  * ``--xla_cpu_enable_concurrency_optimized_scheduler=false``: XLA's temp buffer for the step
    2,386 → 1,953 MiB (the concurrency-optimised schedule keeps more activations alive at once to
    run independent ops in parallel; the U-Net's ops are each multi-threaded already).
  * ``--xla_cpu_use_xnnpack=true``: XNNPACK kernels for convolutions/matmuls; the step at batch 8
    went from 1.60 to 1.35 s (same loss to 6 digits).
  * ``malloc_trim(0)`` after compiling: glibc keeps ~1 GiB freed by the XLA compiler in its heap,
    which the step's buffers cannot reuse; trimming lowers the whole-process peak RSS by ~0.8 GiB.
  * `release_compile_caches` after compiling the step: JAX's in-memory caches still hold the
    parameter-init program and the step's traced/lowered forms; dropping them lowered the
    batch-32 step's peak RSS by a further ~50 MiB (fresh processes: 3,661-3,666 -> 3,598-3,621
    MiB).
  * `keep_freed_memory` (glibc ``mallopt``; ``DDPM_KEEP_FREED_MEMORY=0|1|sync``, default
    ``sync`` for ``launch.py --mode train`` and ``benchmarks.run``, ``0`` elsewhere): XLA
    CPU allocates the step's ~2 GiB of temporary buffers at every execution; glibc serves blocks
    that large with ``mmap`` and unmaps them on free, so every step faults ~3.2 GB of fresh
    zeroed pages back in (~820k minor page faults, ~2 s of kernel time per batch-32 step; a
    1.2-2x slower step whenever another process holds a few GiB on the host). Served from one
    heap that is not trimmed, the same memory is reused: 0 faults, ~0.2 s of kernel time. ``1``
    does that with one heap for all threads, which can fragment: a jitted function with a 256 MiB
    temporary grew the process to ~4 GiB before it stopped faulting (glibc's defaults: ~1 GiB).
    ``DDPM_KEEP_FREED_MEMORY=sync`` keeps glibc's per-thread heaps and instead runs CPU
    computations synchronously on the calling thread, whose heap serves XLA's buffers without
    ``mmap``: the same 0 faults on the train step without one heap shared by all threads (the
    ``1`` mode's lock contention cost as much user time at batch 8 as the faults had). In
    launch.py's real training loop (benchmarks/RESULTS.md §22-§23) ``sync`` ran 1.14-1.27x the
    steps/s of glibc's defaults at batch 8 and 1.30x at batch 32 (CIFAR10 model) at the same
    peak RSS (4,192 vs 4,178 MiB), once a step was no longer queued behind the copy of its
    batch (`diffusion.parallel.global_batch_from_local`). It is the default only for processes
    that just train: in ``--mode train_and_evaluate`` (the main job) evaluation under ``sync``
    took 3 min 49 s against 3 min 10 s and the process peaked at 8.5 GB against 4.8 GB.

The project's environment variables all start with ``DDPM_`` and are read through `getenv`, which
still accepts the names they replaced (`RENAMED_ENV`) with a one-time warning naming the new
one; `cache_dir` is the one cache directory (compiled C++ kernels, FID Inception weights).
Every variable and knob is in docs/performance.md (tests/test_performance_doc.py keeps it
complete).
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import MutableMapping, Optional

#: Old environment variable -> the ``DDPM_`` name that replaces it (the old name keeps working,
#: with one warning per process).
RENAMED_ENV = {
    "DIFFUSION_KEEP_FREED_MEMORY": "DDPM_KEEP_FREED_MEMORY",
    "DDPM_JAX_WINOGRAD_FFI": "DDPM_CPU_KERNELS",
    "DDPM_JAX_CACHE": "DDPM_CACHE_DIR",
}
_warned: set = set()


def getenv(
    name: str, default: Optional[str] = None, environ: Optional[MutableMapping[str, str]] = None
) -> Optional[str]:
    """The value of the environment variable ``name`` in ``environ`` (default ``os.environ``);
    unset or empty: the value of the old name it replaces (`RENAMED_ENV`), logged once per
    process as a warning naming ``name``; else ``default``."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value:
        return value
    for old, new in RENAMED_ENV.items():
        if new == name and env.get(old):
            if old not in _warned:
                _warned.add(old)
                logging.getLogger(__name__).warning(
                    "environment variable %s is deprecated: set %s=%s instead", old, new, env[old]
                )
            return env[old]
    return default


def cache_dir(environ: Optional[MutableMapping[str, str]] = None) -> Path:
    """The project's one cache directory: ``$DDPM_CACHE_DIR`` (old name ``DDPM_JAX_CACHE``), else
    ``~/.cache/ddpm_jax``. Holds the compiled C++ CPU kernels (and their build-failure markers)
    and is searched for the FID Inception weights."""
    root = getenv("DDPM_CACHE_DIR", environ=environ)
    return Path(root) if root else Path.home() / ".cache" / "ddpm_jax"


#: Appended to ``XLA_FLAGS`` by `apply_xla_cpu_flags` unless the user set the same flag.
XLA_CPU_FLAGS = (
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    "--xla_cpu_use_xnnpack=true",
)


def accelerator_plugin_installed() -> bool:
    """True if a TPU (``libtpu``) or GPU (``jax_plugins``, e.g. jax_cuda12_plugin) backend is
    installed, without importing JAX."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("libtpu", "jax_plugins"))


def apply_xla_cpu_flags(
    environ: Optional[MutableMapping[str, str]] = None, *, force: bool = False
) -> str:
    """Adds `XLA_CPU_FLAGS` to ``environ['XLA_FLAGS']`` (default ``os.environ``), keeping any
    value the user gave for the same flag. Takes effect only if called before JAX creates its
    CPU backend (first ``jax.devices()``/computation). Nothing is added where an accelerator
    backend is installed (unless ``force``): their runtimes parse ``XLA_FLAGS`` too and we leave
    them alone. Returns the resulting ``XLA_FLAGS``."""
    env = os.environ if environ is None else environ
    if not force and accelerator_plugin_installed():
        return env.get("XLA_FLAGS", "")
    current = env.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    extra = [f for f in XLA_CPU_FLAGS if f.split("=")[0] not in names]
    env["XLA_FLAGS"] = " ".join(current.split() + extra)
    return env["XLA_FLAGS"]


#: Selects `keep_freed_memory`'s mode: ``0`` (glibc's defaults), ``1`` or ``sync``; when unset, the
#: caller's default (``launch.py --mode train`` and ``benchmarks.run``: ``sync``; elsewhere ``0``).
KEEP_FREED_MEMORY_ENV = "DDPM_KEEP_FREED_MEMORY"
KEEP_FREED_MEMORY_MODES = ("0", "1", "sync")


def keep_freed_memory_mode(
    environ: Optional[MutableMapping[str, str]] = None, default: str = "0"
) -> str:
    """The mode `keep_freed_memory` applies: ``DDPM_KEEP_FREED_MEMORY`` (old name
    ``DIFFUSION_KEEP_FREED_MEMORY``) from ``environ`` (default ``os.environ``) when set and
    non-empty, else ``default``. Raises ValueError naming
    the variable and the accepted values for anything else (a typo must not silently fall back)."""
    if default not in KEEP_FREED_MEMORY_MODES:
        raise ValueError(f"default={default!r} is not one of {KEEP_FREED_MEMORY_MODES}")
    env = os.environ if environ is None else environ
    mode = (getenv(KEEP_FREED_MEMORY_ENV, "", env) or "").strip() or default
    if mode not in KEEP_FREED_MEMORY_MODES:
        raise ValueError(
            f"{KEEP_FREED_MEMORY_ENV}={mode!r} is not one of {', '.join(KEEP_FREED_MEMORY_MODES)}: "
            "0 keeps glibc's defaults, 1 one shared untrimmed heap, sync untrimmed heaps with "
            "synchronous CPU dispatch (see diffusion/cpu_runtime.py)."
        )
    return mode


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory(*, force: bool = False, default: str = "0") -> bool:
    """Makes glibc keep and reuse freed memory instead of returning it to the OS on every free,
    in the mode `keep_freed_memory_mode` gives (``DDPM_KEEP_FREED_MEMORY`` if set, else
    ``default``): ``1`` or ``sync`` apply it, ``0`` keeps glibc's defaults; ``force`` means
    ``1``. ``launch.py --mode train`` and ``benchmarks.run`` pass ``default='sync'``.

    Both modes set ``M_MMAP_MAX=0`` (no per-block ``mmap``: large blocks come from the heap and
    their pages stay mapped after ``free``) and ``M_TRIM_THRESHOLD=SIZE_MAX`` (the heap top is not
    given back by ``free``). Only the main heap can grow past 64 MiB per block without ``mmap``,
    so the large blocks must be allocated there: ``1`` sets ``M_ARENA_MAX=1`` (every thread
    allocates from the main heap); ``sync`` instead turns off JAX's asynchronous CPU dispatch
    (``jax_cpu_enable_async_dispatch``), so that XLA allocates an execution's buffers on the
    calling (main) thread, and leaves the other threads their own heaps. Call it before JAX
    creates its CPU backend (first computation); the entry points do, so the variable is all a
    user sets.

    ``sync``, measured (benchmarks/RESULTS.md §20, CIFAR10 train step): 152k -> ~0 faults at
    batch 8 and 587k -> ~0 at batch 32 per step, kernel time 0.45 -> 0.04 s and 1.9 -> 0.2 s;
    against diffusers in one ``benchmarks.run``, batch 32 1.06x where the run without it
    minutes later measured 0.74x, batch 8 1.12x vs 1.10x. It does not cure every pattern: a
    function whose multi-threaded kernels allocate large scratch blocks on the pool's threads
    still faults, and a 256 MiB-temporary sort grew a process to ~2 GiB (defaults: ~0.8 GiB).
    With synchronous dispatch a call returns only when its result is computed, so the host
    no longer prepares the next step while one runs (the input pipeline still prefetches on its
    own threads). JAX applies the flag only to single-device computations: with several local
    CPU devices dispatch stays asynchronous and the buffers come from the worker threads' heaps
    (not measured there).

    ``1``, measured (benchmarks/RESULTS.md §1): on the CIFAR10 train step at batch 32, 825k -> 0 page
    faults and 2.0 -> 0.2 s of kernel time per step, the same peak RSS (3,620 vs 3,630 MiB), and
    the step no longer slows down 1.2-2x while another process holds memory; but the process
    keeps that memory afterwards (3,496 vs 1,715 MiB after ``malloc_trim``), and in other
    allocation patterns the single heap fragments: a jitted function with a 256 MiB temporary
    grew the process to ~4 GiB (vs ~1 GiB) over its first 7 calls before it stopped faulting.
    Hence never a default.

    Does nothing where an accelerator backend is installed, unless ``force``: there the host
    heap is not the step's memory. Returns True if the settings were applied; False when the
    mode is ``0``, off CPU, where glibc is missing (macOS, musl) or refused a value. Raises
    ValueError only for an unknown value of the variable.
    """
    mode = "1" if force else keep_freed_memory_mode(default=default)
    if mode not in ("1", "sync"):
        return False
    if not force and accelerator_plugin_installed():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = [
            libc.mallopt(_M_ARENA_MAX, 1) if mode == "1" else 1,
            libc.mallopt(_M_MMAP_MAX, 0),
            libc.mallopt(_M_TRIM_THRESHOLD, -1),  # (size_t)-1: never trim on free
        ]
    except (OSError, AttributeError):
        return False
    if mode == "sync":
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return all(v == 1 for v in ok)


def release_compile_caches() -> bool:
    """Drops JAX's in-memory caches of traced, lowered and compiled programs
    (``jax.clear_caches``), collects garbage, then gives the freed heap back to the OS
    (`release_free_heap`). Returns what `release_free_heap` returns.

    For the point after a long-running program has been compiled ahead of time (the training
    loop's ``lower(...).compile()``): the ``Compiled`` object the caller holds keeps its
    executable and stays usable; any ``jax.jit`` function recompiles on its next call, so call
    this once, not in a loop. A cached executable holds its own copies of the program's
    constants, and the caches hold programs nobody will call again (parameter initialisation).
    """
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    return release_free_heap()


def release_free_heap() -> bool:
    """Returns freed heap memory to the OS (glibc ``malloc_trim(0)``), e.g. after XLA compiled a
    large program. False where glibc is not available (macOS, musl); never raises."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False
