"""Winograd F(2x2, 3x3) and F(4x4, 3x3) tile transforms as XLA CPU custom calls (jax.ffi).

The kernels are in `winograd_cpu.cc`.

The pure-JAX transforms of `diffusion.models.conv` are the reference and the fallback; these
kernels compute the same parts with the same arithmetic (identical results, tested) in one pass
over the input instead of one XLA loop fusion per part (benchmarks/RESULTS.md, issue 15).

The kernels are built and registered by `diffusion.models.cpu_kernels` (compiled on first use
with the system's C++ compiler; `available`, `unavailable_reason` and `usable` are re-exported
here). Without them `conv.py` uses its pure-JAX transforms: nothing else changes.
"""

from __future__ import annotations

from typing import List, Sequence

import jax

from diffusion.models.cpu_kernels import available, unavailable_reason, usable

#: How the custom calls run under ``jax.vmap`` (e.g. per-group gradient clipping vmaps the train
#: step's gradient): one call per mapped element, in a loop.
_VMAP = "sequential"


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
    return _grid(a, jax.ffi.ffi_call(f"ddpm_wino{m}_input", [part] * (a * a), vmap_method=_VMAP)(x))


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
    return _grid(a, jax.ffi.ffi_call(f"ddpm_wino{m}_dm", [part] * (a * a), vmap_method=_VMAP)(dy))


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
    return jax.ffi.ffi_call(f"ddpm_wino{m}_output", out, vmap_method=_VMAP)(*flat)


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
    flat = jax.ffi.ffi_call(f"ddpm_wino{m}_filter", [part] * (a * a), vmap_method=_VMAP)(
        w, flip=bool(flip)
    )
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
    return jax.ffi.ffi_call(f"ddpm_wino{m}_filter_grad", out, vmap_method=_VMAP)(*flat)


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
