"""Winograd F(2x2, 3x3) and F(4x4, 3x3) tile transforms as XLA CPU custom calls (`winograd_cpu.cc`, via jax.ffi).

The pure-JAX transforms of `diffusion.models.conv` are the reference and the fallback; these
kernels compute the same parts with the same arithmetic (identical results, tested) in one pass
over the input instead of one XLA loop fusion per part (benchmarks/RESULTS.md, issue 15).

The C++ source ships with the package and is compiled on first use with the system's C++
compiler (``$CXX`` or ``c++``) against the FFI headers that jaxlib ships
(``jax.ffi.include_dir()``); the shared library is cached under ``$DDPM_JAX_CACHE`` (default
``~/.cache/ddpm-jax``), keyed by the source, the compiler flags, jaxlib's version and the machine.
If there is no compiler, or the build fails, `available()` is False (with the reason in
`unavailable_reason()`) and `conv.py` uses its pure-JAX transforms: nothing else changes.
``DDPM_JAX_WINOGRAD_FFI=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_name("winograd_cpu.cc")
_FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-ffp-contract=off",
)
#: custom-call target -> exported handler symbol, for F(2,3) and F(4,3).
_TARGETS = {
    f"ddpm_wino{m}_{kind}": f"DdpmWino{m}{symbol}"
    for m in (2, 4)
    for kind, symbol in (
        ("input", "Input"),
        ("output", "Output"),
        ("dm", "Dm"),
        ("filter", "Filter"),
        ("filter_grad", "FilterGrad"),
    )
}
_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    root = os.environ.get("DDPM_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ddpm-jax"
    )
    return Path(root)


def _library_key(compiler: str) -> str:
    import jaxlib

    h = hashlib.sha256()
    h.update(_SOURCE.read_bytes())
    h.update(" ".join((compiler,) + _FLAGS).encode())
    h.update(jaxlib.__version__.encode())
    h.update(platform.machine().encode())
    try:  # the CPU model: -march=native code must not move to another kind of CPU
        with open("/proc/cpuinfo") as f:
            h.update(
                "".join(line for line in f if line.startswith(("model name", "flags"))).encode()
            )
    except OSError:
        pass
    return h.hexdigest()[:16]


def _build() -> Path:
    """Compiles `winograd_cpu.cc` into the cache (atomically: concurrent processes are safe)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    lib = _cache_dir() / f"winograd_cpu-{_library_key(compiler)}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


def _load() -> None:
    with _lock:
        if "ok" in _state:
            return
        if os.environ.get("DDPM_JAX_WINOGRAD_FFI", "1") == "0":
            _state.update(ok=False, reason="turned off by DDPM_JAX_WINOGRAD_FFI=0")
            return
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build()))
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(
                    target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                )
        except Exception as e:  # noqa: BLE001 - any failure means: use the JAX transforms
            _state.update(ok=False, reason=f"{type(e).__name__}: {e}")
            return
        _state.update(ok=True, reason=None, lib=lib)


def available() -> bool:
    """Whether the custom-call transforms are built and registered (builds them on first call)."""
    _load()
    return bool(_state["ok"])


def unavailable_reason() -> Optional[str]:
    """Why `available()` is False (None when it is True)."""
    _load()
    return _state["reason"]


def usable(dtype) -> bool:
    """The custom calls serve float32 on the CPU backend only."""
    return jnp.dtype(dtype) == jnp.float32 and jax.default_backend() == "cpu" and available()


def _require() -> None:
    if not available():
        raise RuntimeError(
            f"the Winograd custom calls are not available ({unavailable_reason()}); "
            "conv.py uses its pure-JAX transforms in that case"
        )


def _grid(a: int, flat) -> List[List[jax.Array]]:
    return [list(flat[a * p : a * p + a]) for p in range(a)]


def input_parts(x: jax.Array, m: int = 2) -> List[List[jax.Array]]:
    """``V[p][q] = (B^T d B)[p, q]`` of every (m+2)x(m+2) input tile of F(m,3), each
    ``[N*th*tw, C]`` (``p, q < m+2``).

    Args:
      x: ``[N, H, W, C]`` float32; tile (i, j) covers rows ``m*i-1 .. m*i+m`` and columns
        ``m*j-1 .. m*j+m`` ('SAME' padding of 1, zeros outside), ``th, tw = ceil(H/m), ceil(W/m)``.
      m: 2 or 4.
    """
    _require()
    n, h, w, c = x.shape
    a = m + 2
    part = jax.ShapeDtypeStruct((n * -(-h // m) * -(-w // m), c), x.dtype)
    return _grid(a, jax.ffi.ffi_call(f"ddpm_wino{m}_input", [part] * (a * a))(x))


def dm_parts(dy: jax.Array, m: int = 2) -> List[List[jax.Array]]:
    """``dM[p][q] = (A dY A^T)[p, q]`` of every m x m output-gradient tile, each ``[N*th*tw, K]``
    (the transpose of `output`, used by the weight gradient).

    Args:
      dy: ``[N, H, W, K]`` float32; tile (i, j) covers rows ``m*i .. m*i+m-1`` and columns
        ``m*j .. m*j+m-1`` (zeros outside).
      m: 2 or 4.
    """
    _require()
    n, h, w, k = dy.shape
    a = m + 2
    part = jax.ShapeDtypeStruct((n * -(-h // m) * -(-w // m), k), dy.dtype)
    return _grid(a, jax.ffi.ffi_call(f"ddpm_wino{m}_dm", [part] * (a * a))(dy))


def output(parts: Sequence[Sequence[jax.Array]], shape, m: int = 2) -> jax.Array:
    """``Y = A^T M A`` per tile, assembled into ``[N, H, W, K]`` (``shape``) and cropped.

    Args:
      parts: (m+2) x (m+2) nested ``M[p][q]``, each ``[N*th*tw, K]`` float32.
      shape: ``(N, H, W, K)`` of the result.
      m: 2 or 4.
    """
    _require()
    a = m + 2
    flat = [parts[p][q] for p in range(a) for q in range(a)]
    out = jax.ShapeDtypeStruct(tuple(shape), flat[0].dtype)
    return jax.ffi.ffi_call(f"ddpm_wino{m}_output", out)(*flat)


def filter_parts(w: jax.Array, m: int = 2, flip: bool = False) -> List[List[jax.Array]]:
    """``U[p][q] = (G g G^T)[p, q]`` of the kernel ``g = w`` (or ``w[::-1, ::-1]`` with ``flip``),
    each ``[Cin, Cout]``.

    Args:
      w: ``[3, 3, Cin, Cout]`` float32.
      m: 2 or 4.
    """
    _require()
    a = m + 2
    part = jax.ShapeDtypeStruct(tuple(w.shape[2:]), w.dtype)
    flat = jax.ffi.ffi_call(f"ddpm_wino{m}_filter", [part] * (a * a))(w, flip=bool(flip))
    return _grid(a, flat)


def filter_grad(du: Sequence[Sequence[jax.Array]], m: int = 2) -> jax.Array:
    """``dw = G^T dU G`` (the transpose of `filter_parts`), ``[3, 3, Cin, Cout]``.

    Args:
      du: (m+2) x (m+2) nested ``dU[p][q]``, each ``[Cin, Cout]`` float32.
      m: 2 or 4.
    """
    _require()
    a = m + 2
    flat = [du[p][q] for p in range(a) for q in range(a)]
    out = jax.ShapeDtypeStruct((3, 3) + tuple(flat[0].shape), flat[0].dtype)
    return jax.ffi.ffi_call(f"ddpm_wino{m}_filter_grad", out)(*flat)


__all__ = [
    "available",
    "unavailable_reason",
    "usable",
    "input_parts",
    "dm_parts",
    "output",
    "filter_parts",
    "filter_grad",
]
