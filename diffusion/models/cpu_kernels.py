"""C++ CPU kernels as XLA custom calls (jax.ffi): the Winograd tile transforms
(`winograd_cpu.cc`, used through `winograd_ffi`) and GroupNorm (`group_norm_cpu.cc`, used by
`group_norm`).

The C++ sources ship with the package and are compiled on first use with the system's C++
compiler (``$CXX`` or ``c++``) against the FFI headers that jaxlib ships
(``jax.ffi.include_dir()``) into one shared library, cached under ``$DDPM_JAX_CACHE`` (default
``~/.cache/ddpm-jax``), keyed by the sources, the compiler flags, jaxlib's version and the CPU.
If there is no compiler, or the build fails, `available()` is False (with the reason in
`unavailable_reason()`) and the callers use their pure-JAX forms: nothing else changes.
``DDPM_JAX_WINOGRAD_FFI=0`` turns the kernels off (the name predates the GroupNorm kernels).
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
from typing import Optional

import jax
import jax.numpy as jnp

#: the C++ sources, compiled together into one shared library.
_SOURCES = tuple(Path(__file__).with_name(n) for n in ("winograd_cpu.cc", "group_norm_cpu.cc"))
#: headers they include (part of the cache key).
_HEADERS = (Path(__file__).with_name("parallel_for.h"),)
_FLAGS = (
    "-O3",
    "-march=native",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-fno-math-errno",
    "-ffp-contract=off",
)
#: custom-call target -> exported handler symbol: Winograd F(2,3) and F(4,3), GroupNorm.
_TARGETS = {
    "ddpm_group_norm_fwd": "DdpmGroupNormFwd",
    "ddpm_group_norm_bwd": "DdpmGroupNormBwd",
    **{
        f"ddpm_wino{m}_{kind}": f"DdpmWino{m}{symbol}"
        for m in (2, 4)
        for kind, symbol in (
            ("input", "Input"),
            ("output", "Output"),
            ("dm", "Dm"),
            ("filter", "Filter"),
            ("filter_grad", "FilterGrad"),
        )
    },
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
    for source in _SOURCES + _HEADERS:
        h.update(source.read_bytes())
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
    """Compiles `_SOURCES` into the cache (atomically: concurrent processes are safe)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++)")
    lib = _cache_dir() / f"cpu_kernels-{_library_key(compiler)}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [
        compiler,
        *_FLAGS,
        f"-I{jax.ffi.include_dir()}",
        f"-I{_SOURCES[0].parent}",
        *map(str, _SOURCES),
        "-o",
        tmp,
    ]
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
