"""C++ CPU kernels as XLA custom calls (jax.ffi): the Winograd tile transforms
(`winograd_cpu.cc`, used through `winograd_ffi`) and GroupNorm (`group_norm_cpu.cc`, used by
`group_norm`).

The C++ sources ship with the package and are compiled on first use with the system's C++
compiler (``$CXX``, else ``c++`` or ``g++``) against the FFI headers that jaxlib ships
(``jax.ffi.include_dir()``) into one shared library, cached in the project's cache directory
(``$DDPM_CACHE_DIR``, default ``~/.cache/ddpm_jax``; `diffusion.cpu_runtime.cache_dir`) under
``cpu_kernels/``, keyed by the sources, the compiler, the flags, jaxlib's version and the CPU.
A compiler that rejects ``-march=native`` (e.g. some Apple clang versions) is retried once
without it. A failed build is logged once (a warning with the compiler's error) and remembered:
a marker file ``cpu_kernels-<key>.failed`` beside where the library would be holds the error, and
later processes with the same key read it instead of compiling again (delete it, or change the
compiler/sources, to retry). Then, as without a compiler, `available()` is False (the reason in
`unavailable_reason()`) and the callers use their pure-JAX forms: the same results, slower.
``DDPM_CPU_KERNELS=0`` (old name ``DDPM_JAX_WINOGRAD_FFI``) turns the kernels off.
`status_line` says in one line which kernels run, or why not (launch.py logs it).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
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

from diffusion import cpu_runtime

#: the C++ sources, compiled together into one shared library.
_SOURCES = tuple(Path(__file__).with_name(n) for n in ("winograd_cpu.cc", "group_norm_cpu.cc"))
#: headers they include (part of the cache key).
_HEADERS = (Path(__file__).with_name("parallel_for.h"),)
#: Compiler flags (part of the cache key); ``-march=native`` is dropped when the compiler
#: rejects it (`_NATIVE`).
_NATIVE = "-march=native"
_FLAGS = (
    "-O3",
    _NATIVE,
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


#: Turns the kernels off when set to ``0`` (old name: ``DDPM_JAX_WINOGRAD_FFI``).
ENABLE_ENV = "DDPM_CPU_KERNELS"


def _cache_dir() -> Path:
    return cpu_runtime.cache_dir() / "cpu_kernels"


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


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _compile(compiler: str, flags, out: str) -> subprocess.CompletedProcess:
    cmd = [
        compiler,
        *flags,
        f"-I{jax.ffi.include_dir()}",
        f"-I{_SOURCES[0].parent}",
        *map(str, _SOURCES),
        "-o",
        out,
    ]
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # not executable, not found
        return subprocess.CompletedProcess(cmd, 127, "", f"{type(e).__name__}: {e}")


def _failure_text(proc: subprocess.CompletedProcess) -> str:
    """``'<compiler> exited with status N: <its first error line>'``."""
    err = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
    first = next((ln for ln in err if "error" in ln.lower()), err[0] if err else "(no output)")
    return f"{proc.args[0]} exited with status {proc.returncode}: {first.strip()[:300]}"


def _build() -> Path:
    """Compiles `_SOURCES` into the cache (atomically: concurrent processes are safe) and returns
    the library's path. Raises RuntimeError with the reason when there is no compiler, when the
    build fails (the compiler's error is also written to the key's ``.failed`` marker), or when
    the marker says an earlier process's build with the same key failed (no compile then)."""
    compiler = _compiler()
    if not compiler:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    key = _library_key(compiler)
    lib = _cache_dir() / f"cpu_kernels-{key}.so"
    failed = lib.with_suffix(".failed")
    if lib.exists():
        return lib
    if failed.exists():
        first = (failed.read_text(errors="replace").strip().splitlines() or ["?"])[0]
        raise RuntimeError(
            f"an earlier C++ build with this compiler and these sources failed: {first[:300]} "
            f"(not retried; delete {failed} to retry)"
        )
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        proc = _compile(compiler, _FLAGS, tmp)
        if proc.returncode != 0 and _NATIVE in _FLAGS and "native" in (proc.stderr or ""):
            # e.g. Apple clang on arm64: "unsupported argument 'native' to option '-march='"
            proc = _compile(compiler, [f for f in _FLAGS if f != _NATIVE], tmp)
        if proc.returncode != 0:
            reason = _failure_text(proc)
            log = f"{reason}\n\n$ {' '.join(map(str, proc.args))}\n{proc.stderr or ''}"
            _write_atomic(failed, log[-20000:])
            raise RuntimeError(f"the C++ build failed: {reason} (remembered in {failed})")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _load(quiet: bool = False) -> None:
    """Builds (if needed), loads and registers the kernels once per process; a failure is
    logged as a warning unless ``quiet`` (`status_line`, whose caller logs the reason)."""
    with _lock:
        if "ok" in _state:
            return
        if cpu_runtime.getenv(ENABLE_ENV, "1") == "0":
            _state.update(ok=False, reason=f"turned off by {ENABLE_ENV}=0")
            return
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build()))
            for target, symbol in _TARGETS.items():
                jax.ffi.register_ffi_target(
                    target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu"
                )
        except Exception as e:  # noqa: BLE001 - any failure means: use the JAX transforms
            reason = f"{type(e).__name__}: {e}"
            _state.update(ok=False, reason=reason)
            if quiet:
                return
            logging.getLogger(__name__).warning(
                "C++ CPU kernels (Winograd transforms, GroupNorm) unavailable, using the slower "
                "pure-JAX forms: %s",
                reason,
            )
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


#: How `status_line` starts when the kernels should run but do not (a caller may warn then).
FALLBACK = "CPU kernels: pure-JAX fallback"


def status_line(dtype="float32", conv_impl: str = "auto") -> str:
    """One line saying how the U-Net's convolutions and GroupNorms are computed for a run whose
    compute dtype is ``dtype`` and whose ``config.runtime.conv_impl`` is ``conv_impl``: the C++
    custom calls, the pure-JAX fallback (and why: no compiler, the build failed (with the
    compiler's first error line), turned off by the variable) or XLA's own kernels (and why:
    not the CPU backend, not float32, ``conv_impl='xla'``). Builds the kernels if needed; a
    failed build is then not logged separately (the line has its reason)."""
    backend = jax.default_backend()
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:  # an invalid config value: validated (and reported) later
        dtype = str(dtype)
    if backend != "cpu" or dtype != jnp.float32:
        why = f"backend {backend}" if backend != "cpu" else f"compute dtype {dtype}"
        return (
            f"CPU kernels: XLA's convolutions and GroupNorm ({why}; the C++ kernels: CPU float32)"
        )
    _load(quiet=True)  # the reason is in the line: no separate warning
    if available():
        convs = (
            "XLA convolutions (conv_impl='xla')"
            if conv_impl == "xla"
            else f"Winograd convolutions (conv_impl={conv_impl!r}) with C++ tile transforms"
        )
        return (
            f"CPU kernels: C++ custom calls: {convs}, C++ GroupNorm (library {_state['lib']._name})"
        )
    reason = (unavailable_reason() or "").splitlines()[0][:400]
    return (
        f"{FALLBACK} (slower: Winograd transforms and GroupNorm as XLA fusions; "
        f"conv_impl={conv_impl!r}) because {reason}"
    )
