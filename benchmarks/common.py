"""Timing, machine and memory utilities shared by the benchmarks (no JAX/torch import at load time).

Everything heavy is imported inside the functions that need it, so that a process measuring the
peer's memory never loads JAX and vice versa.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence


# ----------------------------------------------------------------------------- threads
def set_threads(n: Optional[int]) -> int:
    """Restricts this process (and its children) to ``n`` CPUs and returns the count used.

    XLA's CPU thread pool sizes itself from the CPU affinity mask, so pinning the process to the
    first ``n`` allowed CPUs gives JAX and torch (``torch.set_num_threads(n)``) the same cores.
    ``None`` keeps the current mask (all cores by default).
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return n or os.cpu_count() or 1
    if n is not None and 0 < n < len(allowed):
        os.sched_setaffinity(0, allowed[:n])
        return n
    return len(allowed)


# ----------------------------------------------------------------------------- timing
def summarize(times: Sequence[float]) -> Dict[str, float]:
    """Median / min / max / count of a list of durations in seconds."""
    if not times:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "n": len(times),
    }


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any] = lambda r: r) -> float:
    """Seconds taken by ``sync(fn())`` (``sync`` blocks until the result is ready)."""
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def jax_sync(x):
    """``jax.block_until_ready`` (imported lazily)."""
    import jax

    return jax.block_until_ready(x)


def cost_flops(compiled) -> float:
    """FLOPs of a compiled JAX computation from XLA's cost analysis (``nan`` if unavailable).

    ``Compiled.cost_analysis()`` returns a dict in current JAX (0.4.3x and later) and returned a
    list with one dict per partition in older releases; both are handled.
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # pylint: disable=broad-except
        return math.nan
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca:
        return math.nan
    return float(ca.get("flops", math.nan))


def matmul_peak(sizes: Iterable[int] = (1024, 2048), repeats: int = 5) -> Dict[str, Any]:
    """The machine's fp32 peak as seen by XLA: FLOP/s of a jitted ``n×n @ n×n`` (2n³ flops).

    For each size: one warm-up call, then the median of ``repeats`` timed calls. Returns the best
    of those medians as ``peak_flops`` together with the per-size results.
    """
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda a, b: a @ b)
    per_size = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        jax.block_until_ready(f(a, b))
        times = [time_call(lambda: f(a, b), jax.block_until_ready) for _ in range(max(repeats, 1))]
        s = summarize(times)
        per_size[str(n)] = {
            "median_s": s["median"],
            "flops": 2.0 * n**3,
            "flops_per_s_median": 2.0 * n**3 / s["median"],
            "flops_per_s_best": 2.0 * n**3 / s["min"],
        }
    best = max(per_size.values(), key=lambda r: r["flops_per_s_median"])
    return {
        "peak_flops": best["flops_per_s_median"],
        "sizes": per_size,
        "method": "best over sizes of the median FLOP/s of a jitted fp32 n×n matmul",
    }


# ----------------------------------------------------------------------------- memory
def maxrss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``: KiB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def _proc_status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rss_now_mb() -> float:
    """Current resident set size in MiB (``VmRSS`` from /proc; falls back to ``maxrss_mb``)."""
    v = _proc_status_mb("VmRSS")
    return maxrss_mb() if v is None else v


def peak_rss_mb() -> float:
    """Peak RSS of this process image in MiB: ``VmHWM`` from /proc (falls back to ``maxrss_mb``).

    Prefer this over ``ru_maxrss`` in a subprocess: Linux carries the *parent's* high-water mark
    into the child's ``ru_maxrss`` across fork + exec (the forked copy maps all the parent's
    pages for a moment), so a child of a large process reports at least the parent's RSS.
    ``VmHWM`` belongs to the address space created by exec and starts afresh.
    """
    v = _proc_status_mb("VmHWM")
    return maxrss_mb() if v is None else v


def reset_peak_rss() -> bool:
    """Resets ``VmHWM`` to the current RSS (writes 5 to /proc/self/clear_refs, Linux >= 4.0) so
    that a later `peak_rss_mb` covers only what follows; returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Returns free heap memory to the OS (glibc ``malloc_trim(0)``); False where unavailable.

    Used only after the measurements, to show how much of the RSS is freed-but-retained heap
    (e.g. left over from XLA compilation) rather than live data."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> Dict[str, Any]:
    """CPU model, logical cores, CPUs this process may use, OS and Python."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": load,
    }


def versions() -> Dict[str, Optional[str]]:
    """Installed versions of jax, jaxlib, flax, optax, numpy, torch, diffusers (None if absent)."""
    from importlib import metadata

    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "diffusers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------------------- printing
def format_table(header: Sequence[str], rows: List[Sequence[Any]]) -> str:
    """A plain-text table with ``|`` separators, columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(x: Any, spec: str = ".3g") -> str:
    """Formats a number (``n/a`` for None / nan)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)
