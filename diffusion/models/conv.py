"""3x3 convolutions (stride 1, 'SAME') computed by XLA or by Winograd transforms + batched matmuls.

Why: on CPU, XLA's convolution kernels (above all the backward-filter convolution that computes
weight gradients) run at a fraction of XLA's matmul rate (benchmarks/RESULTS.md). Winograd's
minimal filtering F(m x m, 3 x 3) rewrites a 3x3 convolution as

    Y = A^T [ (G w G^T) . (B^T d B) ] A        for every (m+2) x (m+2) input tile d,

i.e. a cheap elementwise transform of the input tiles and of the kernels, ``(m+2)^2`` batched
matrix products over the channels (where XLA CPU is fast), and a cheap output transform.

Implementations (per direction, see `conv3x3`):
  ``xla``  ``lax.conv_general_dilated`` (XLA's own kernels; its autodiff for the backward pass).
  ``w2``   Winograd F(2x2, 3x3): 4x4 tiles, 16 matmuls, 2.25x fewer multiplies than direct.
           fp32 error ~1e-7 relative (same order as the direct convolution's).
  ``w4``   Winograd F(4x4, 3x3): 6x6 tiles, 36 matmuls, 4x fewer multiplies. Its transforms have
           entries up to 8 and 1/24, so its fp32 error is larger: measured ~1e-6..5e-6 relative
           to the float64 result (vs ~2e-7 for lax.conv), see tests/test_conv.py.

Model-level choices (``config.runtime.conv_impl``, `IMPLS`):
  ``xla``        lax.conv forward and backward: exactly what nn.Conv does (the default off CPU).
  ``winograd``   F(2,3) forward, input gradient and weight gradient.
  ``winograd4``  F(4,3) in all three directions.
  ``mixed``      XLA forward and input gradient, F(2,3) weight gradient (only XLA's slow
                 backward-filter convolution replaced).
  ``auto``       on CPU with float32 compute: a fixed per-layer-shape rule measured on the
                 benchmark machine (`_cpu_rule`: F(4,3) for layers >= 16x16 with >= 64
                 channels; below 16x16 F(2,3); XLA's conv for the RGB convs);
                 on GPU/TPU, or for other dtypes: ``xla``. When a convolution is not
                 differentiated (sampling, evaluation) ``auto`` runs the method of
                 `infer_method` instead (the same forward methods as training on every
                 U-Net layer here).

`infer_method` is the one forward-only rule of ``auto``, for every kernel shape (``xla``, ``w2``,
``w4``, ``dot`` for 1x1, ``taps`` for 3x3 stride 2): the U-Net calls it for its 3x3 stride-1
convs (`auto_infer_choice`), the FID Inception network for each of its convs
(`diffusion.metrics.inception.network.conv_method`). Only the training plan (`_cpu_rule`, three
directions) is separate.

All but ``xla`` go through one ``jax.custom_vjp`` whose residuals are just ``(x, w)`` (as for
XLA's conv), so the Winograd-transformed activations are recomputed in the backward pass rather
than kept alive: peak memory stays like XLA's. The input gradient of a stride-1 'SAME' 3x3
convolution is itself such a convolution (of ``dy`` with the spatially flipped, in/out-swapped
kernel) and is computed with the chosen forward method; the weight gradient is the transpose of
the chosen method with respect to ``w`` (for Winograd: ``G^T [sum_tiles V^T dM] G``, again 16/36
batched matmuls, this time contracting over batch x tiles).

On CPU in float32, F(2,3)'s and F(4,3)'s tile transforms (input, output, the weight gradient's ``dM``, and
the kernel transform and its transpose) run as C++ XLA custom calls (`winograd_ffi`, built from
``winograd_cpu.cc`` on first use with the system's C++ compiler): one pass over the data instead
of one XLA loop fusion per part, the same additions in the same order as the pure-JAX forms here,
which stay as the fallback (no compiler, ``DDPM_CPU_KERNELS=0``) and as the tests' reference.
The transformed kernels are computed once per layer and direction, outside the batch chunks.

Parameters are always plain HWIO ``[3, 3, Cin, Cout]`` kernels: the implementation is a pure
compute choice; checkpoints and parameter trees do not depend on it.
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion.models import winograd_ffi

#: Allowed values of ``config.runtime.conv_impl``.
IMPLS = ("auto", "xla", "winograd", "winograd4", "mixed")

#: Per-direction kernels: forward (y), input gradient (dx), weight gradient (dw).
METHODS = ("xla", "w2", "w4")

#: model-level name -> (forward, input gradient, weight gradient) method.
PLANS: Dict[str, Tuple[str, str, str]] = {
    "xla": ("xla", "xla", "xla"),
    "winograd": ("w2", "w2", "w2"),
    "winograd4": ("w4", "w4", "w4"),
    "mixed": ("xla", "xla", "w2"),
}

_DN = ("NHWC", "HWIO", "NHWC")


def check_conv_impl(value, field: str = "config.runtime.conv_impl", allowed=IMPLS) -> str:
    """Returns ``value`` if it is one of ``allowed`` (default `IMPLS`), else raises
    ``ValueError`` naming ``field`` and the allowed values."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"{field}={value!r} is not one of {list(allowed)} "
            f"(auto: per-layer choice on CPU, XLA's conv elsewhere)"
        )
    return value


# ----------------------------------------------------------------------------------------------
# Winograd matrices (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks").
# These compute correlation (no kernel flip), like lax.conv.
# ----------------------------------------------------------------------------------------------
_F2 = dict(
    BT=np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
    G=np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
    AT=np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64),
)
_F4 = dict(
    BT=np.array(
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        np.float64,
    ),
    G=np.array(
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        np.float64,
    ),
    AT=np.array(
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
        np.float64,
    ),
)
_MATS = {"w2": (2, _F2), "w4": (4, _F4)}


def _lin(coeffs, terms):
    """``sum_i coeffs[i] * terms[i]`` skipping zero coefficients and multiplications by 1."""
    out = None
    for c, t in zip(coeffs, terms):
        c = float(c)
        if c == 0.0:
            continue
        term = t if c == 1.0 else (-t if c == -1.0 else t * jnp.asarray(c, t.dtype))
        out = term if out is None else out + term
    return out


def xla_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    """XLA's 3x3 stride-1 'SAME' convolution, NHWC x HWIO -> NHWC (what ``nn.Conv`` computes)."""
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)


def _input_tiles(x: jax.Array, m: int, th: int, tw: int):
    """The (m+2)^2 input-transform parts ``V[p][q] = (B^T d B)[p, q]`` of every tile, each
    ``[N*th*tw, C]``. Kept as separate arrays: stacking them (or writing the stack as one
    broadcast fusion) made the whole train step 2x slower on XLA CPU (benchmarks/RESULTS.md)."""
    BT = _MATS[f"w{m}"][1]["BT"]
    a = m + 2
    n, h, wd, c = x.shape
    # 'SAME' pad of 1, then up to (th+1)*m rows / (tw+1)*m columns so that tile t's row i is
    # block t (+1 if i >= m), offset i mod m, of a reshape (contiguous slices, no strides).
    xp = jnp.pad(x, ((0, 0), (1, (th + 1) * m - h - 1), (1, (tw + 1) * m - wd - 1), (0, 0)))
    xr = xp.reshape(n, th + 1, m, (tw + 1) * m, c)
    rows = [xr[:, i // m : i // m + th, i % m] for i in range(a)]  # [N, th, Wp, C]
    v = []
    for p in range(a):
        rp = _lin(BT[p], rows).reshape(n, th, tw + 1, m, c)
        cols = [rp[:, :, j // m : j // m + tw, j % m] for j in range(a)]  # [N, th, tw, C]
        v.append([_lin(BT[q], cols).reshape(n * th * tw, c) for q in range(a)])
    return v


def _filter_parts(w: jax.Array, m: int):
    """``U[p][q] = (G w G^T)[p, q]``, each ``[Cin, Cout]``, as sums (the same ops in any dtype)."""
    G = _MATS[f"w{m}"][1]["G"]
    a = m + 2
    taps = [[w[i, j] for j in range(3)] for i in range(3)]
    rows = [[_lin(G[p], [taps[i][j] for i in range(3)]) for j in range(3)] for p in range(a)]
    return [[_lin(G[q], rows[p]) for q in range(a)] for p in range(a)]


def winograd_conv(x: jax.Array, w: jax.Array, m: int = 2, *, transposed: bool = False) -> jax.Array:
    """Winograd F(m x m, 3 x 3) convolution (``m`` = 2 or 4), same result as `xla_conv`.

    Args:
      x: ``[N, H, W, Cin]``; any H, W >= 1 (padded up to a multiple of ``m``, result cropped).
      w: ``[3, 3, Cin, Cout]``.
      m: output tile size.
      transposed: convolve with the spatially flipped, in/out-swapped kernel (``w`` is then
        ``[3, 3, Cout, Cin]``): the input gradient of ``conv(., w)``. The swap is done by the
        matmuls (transposed operand), not by moving the kernel in memory.

    Returns:
      ``[N, H, W, Cout]`` in the dtype of ``x``/``w``.
    """
    return _conv_with_filter(x, winograd_filter(w, m, transposed=transposed), m, transposed)


def winograd_filter(w: jax.Array, m: int = 2, *, transposed: bool = False):
    """The ``(m+2)^2`` transformed kernels ``U[p][q] = (G g G^T)[p, q]``, each ``[Cin, Cout]``, of
    ``g = w`` (``transposed``: of the spatially flipped ``w[::-1, ::-1]``); ``w`` is
    ``[3, 3, Cin, Cout]``. Computed once per layer and shared by all batch chunks."""
    if _ffi_transforms(m, w.dtype):
        return winograd_ffi.filter_parts(w, m, flip=transposed)
    return _filter_parts(w[::-1, ::-1] if transposed else w, m)


def _conv_with_filter(x: jax.Array, u, m: int, transposed: bool) -> jax.Array:
    """`winograd_conv` of ``x`` ``[N, H, W, Cin]`` with the transformed kernels ``u``."""
    a = m + 2
    n, h, wd, _ = x.shape
    k = u[0][0].shape[0] if transposed else u[0][0].shape[1]
    th, tw = -(-h // m), -(-wd // m)
    ffi = _ffi_transforms(m, x.dtype) and jnp.dtype(u[0][0].dtype) == jnp.float32
    v = winograd_ffi.input_parts(x, m) if ffi else _input_tiles(x, m, th, tw)
    # (m+2)^2 matrix products over the channels: [N*th*tw, Cin] @ [Cin, Cout].
    mm = [
        [jnp.matmul(v[p][q], u[p][q].T if transposed else u[p][q]) for q in range(a)]
        for p in range(a)
    ]
    if ffi:
        return winograd_ffi.output(mm, (n, h, wd, k), m)
    return _output_tiles(mm, m, (n, h, wd, k))


def _output_tiles(mm, m: int, shape) -> jax.Array:
    """Output transform ``Y = A^T M A`` of every tile, assembled into ``shape`` = ``[N, H, W, K]``
    (cropped); ``mm[p][q]`` are the ``(m+2)^2`` matmul results, each ``[N*th*tw, K]``."""
    AT = _MATS[f"w{m}"][1]["AT"]
    a = m + 2
    n, h, wd, k = shape
    th, tw = -(-h // m), -(-wd // m)
    mm = [[mm[p][q].reshape(n, th, tw, k) for q in range(a)] for p in range(a)]
    t = [[_lin(AT[s], mm[p]) for s in range(m)] for p in range(a)]
    y = [[_lin(AT[r], [t[p][s] for p in range(a)]) for s in range(m)] for r in range(m)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in y], axis=2)  # [N, th, m, tw, m, K]
    y = y.reshape(n, th * m, tw * m, k)
    return y[:, :h, :wd, :]


def _dm_tiles(dy: jax.Array, m: int, th: int, tw: int):
    """``dM[p][q] = (A dY A^T)[p, q]`` of every m x m output-gradient tile (the transpose of the
    output transform), each ``[N*th*tw, K]``; ``dy`` is ``[N, H, W, K]``, zero-padded to tiles."""
    AT = _MATS[f"w{m}"][1]["AT"]
    a = m + 2
    n, h, wd, k = dy.shape
    dyp = jnp.pad(dy, ((0, 0), (0, th * m - h), (0, tw * m - wd), (0, 0)))
    d6 = dyp.reshape(n, th, m, tw, m, k)
    d = [[d6[:, :, r, :, s, :] for s in range(m)] for r in range(m)]
    t = [[_lin(AT[:, p], [d[r][s] for r in range(m)]) for s in range(m)] for p in range(a)]
    return [[_lin(AT[:, q], t[p]).reshape(n * th * tw, k) for q in range(a)] for p in range(a)]


def winograd_wgrad(x: jax.Array, dy: jax.Array, m: int = 2) -> jax.Array:
    """dL/dw of ``winograd_conv(x, w, m)`` (= of the convolution) for output gradient ``dy``.

    ``dU[p,q] = V[p,q]^T dM[p,q]`` with ``dM = A dY A^T`` per tile ((m+2)^2 matrix products that
    contract over batch x tiles), then ``dw = G^T dU G``.

    Args:
      x: ``[N, H, W, Cin]``.
      dy: ``[N, H, W, Cout]``.
      m: output tile size (2 or 4).

    Returns:
      ``[3, 3, Cin, Cout]``.
    """
    return _filter_grad(_wgrad_parts(x, dy, m), m)


def _wgrad_parts(x: jax.Array, dy: jax.Array, m: int):
    """``dU[p][q] = V[p][q]^T dM[p][q]``, each ``[Cin, Cout]`` (before the filter transpose)."""
    a = m + 2
    _, h, wd, _ = x.shape
    th, tw = -(-h // m), -(-wd // m)
    if _ffi_transforms(m, x.dtype) and jnp.dtype(dy.dtype) == jnp.float32:
        v = winograd_ffi.input_parts(x, m)
        dm = winograd_ffi.dm_parts(dy, m)
    else:
        v = _input_tiles(x, m, th, tw)
        dm = _dm_tiles(dy, m, th, tw)
    return [[jnp.matmul(v[p][q].T, dm[p][q]) for q in range(a)] for p in range(a)]


def _filter_grad(du, m: int) -> jax.Array:
    """``dw = G^T dU G``: ``[3, 3, Cin, Cout]`` from the ``(m+2)^2`` parts ``dU[p][q]``."""
    if _ffi_transforms(m, du[0][0].dtype):
        return winograd_ffi.filter_grad(du, m)
    G = _MATS[f"w{m}"][1]["G"]
    a = m + 2
    # dw[i, j] = sum_{p,q} G[p, i] G[q, j] dU[p, q]
    t2 = [[_lin(G[:, j], du[p]) for j in range(3)] for p in range(a)]
    return jnp.stack(
        [
            jnp.stack([_lin(G[:, i], [t2[p][j] for p in range(a)]) for j in range(3)])
            for i in range(3)
        ]
    )


def _ffi_transforms(m: int, dtype) -> bool:
    """Whether F(m,3)'s tile transforms run as the C++ custom calls of `winograd_ffi` (float32,
    CPU, kernels built) instead of the pure-JAX forms above (same operations, same results)."""
    return m in (2, 4) and winograd_ffi.usable(dtype)


#: Most tile rows (images x tiles per image) one F(2,3) matmul takes at once; larger batches are
#: computed in chunks of whole images (`_by_chunks`): at batch 32 the U-Net's 32x32 layers (F(2,3):
#: 256 tiles per image) go 4 images at a time, at batch 8 likewise. Measured on the CIFAR10
#: train step (benchmarks/RESULTS.md): XLA's temporary buffers at batch 32 were 3,110 MiB
#: unchunked (all tiles of a layer's transforms live at once), 2,356 MiB with 2,048 rows and
#: 2,005 MiB with 1,024 (XLA's own convs: 1,953 MiB), and the step got faster (3.71 -> 4.07
#: images/s); at batch 8, 2,048 / 1,024 / 512 rows ran within noise of each other.
#: F(m,3) gets the same budget in transformed elements: ``MAX_TILE_ROWS * 16 / (m+2)^2`` rows
#: (455 for F(4,3): 4 images of 64 tiles at 32x32). With F(4,3) at 1,024 rows the batch-32 step's
#: peak RSS was 3,582 MiB against 3,417 with 256 (4 % slower; RESULTS.md §17).
MAX_TILE_ROWS = 1024

#: The F(2,3) weight gradient's row budget (it runs under 16x16 only, mid-backward where most
#: activations are still live): with `MAX_TILE_ROWS` the batch-32 CIFAR10 step's XLA temporaries
#: grew by 110 MiB (2,215 -> 2,325 MiB), with 64 rows (4 images of 8x8) not at all (2,216), the
#: step's speed within noise at batch 32 and 1.08x XLA's gradients at batch 8 (RESULTS.md §21).
W2_WGRAD_MAX_TILE_ROWS = 64


def _chunk_images(n: int, h: int, w: int, m: int, max_rows: Optional[int] = None) -> int:
    """The largest divisor ``c`` of the batch ``n`` with ``c * tiles(h, w) * (m+2)^2 <= 16 *
    max_rows`` (>= 1; ``max_rows``, in F(2,3) tile rows, defaults to `MAX_TILE_ROWS`, read when
    the layer is traced)."""
    max_rows = MAX_TILE_ROWS if max_rows is None else max_rows
    tiles = (-(-h // m)) * (-(-w // m))
    best = 1
    for c in range(1, n + 1):
        if n % c == 0 and c * tiles * (m + 2) ** 2 <= 16 * max_rows:
            best = c
    return best


def _by_chunks(fn, chunk: int, *arrays):
    """``fn(*arrays)`` computed on ``chunk`` images at a time with ``lax.map`` (one compiled body;
    only one chunk's transforms are live), results concatenated back along the batch."""
    n = arrays[0].shape[0]
    if chunk >= n:
        return fn(*arrays)
    split = [a.reshape((n // chunk, chunk) + a.shape[1:]) for a in arrays]
    out = lax.map(lambda xs: fn(*xs), tuple(split))
    return out.reshape((n,) + out.shape[2:])


def _fwd_method(method: str, x: jax.Array, w: jax.Array) -> jax.Array:
    if method == "xla":
        return xla_conv(x, w)
    m = _MATS[method][0]
    chunk = _chunk_images(x.shape[0], x.shape[1], x.shape[2], m)
    u = winograd_filter(w, m)
    return _by_chunks(lambda x_: _conv_with_filter(x_, u, m, False), chunk, x)


def _dx_method(method: str, dy: jax.Array, w: jax.Array) -> jax.Array:
    if method == "xla":  # XLA's own backward-input convolution
        x_shape = jax.ShapeDtypeStruct(dy.shape[:3] + w.shape[2:3], dy.dtype)
        return jax.linear_transpose(lambda x_: xla_conv(x_, w), x_shape)(dy)[0]
    m = _MATS[method][0]
    chunk = _chunk_images(dy.shape[0], dy.shape[1], dy.shape[2], m)
    u = winograd_filter(w, m, transposed=True)
    return _by_chunks(lambda d_: _conv_with_filter(d_, u, m, True), chunk, dy)


def _wgrad_method(method: str, x: jax.Array, dy: jax.Array, w: jax.Array) -> jax.Array:
    if method == "xla":
        _, vjp_w = jax.vjp(lambda w_: xla_conv(x, w_), w)
        return vjp_w(dy)[0]
    m = _MATS[method][0]
    rows = W2_WGRAD_MAX_TILE_ROWS if m == 2 else None
    chunk = _chunk_images(x.shape[0], x.shape[1], x.shape[2], m, rows)
    if chunk >= x.shape[0]:
        return winograd_wgrad(x, dy, m).astype(w.dtype)
    # Sum of the per-chunk dU parts, accumulated in a scan carry (fp32 like the matmuls), then
    # one filter transpose for the whole batch.
    n = x.shape[0]
    xs = x.reshape((n // chunk, chunk) + x.shape[1:])
    dys = dy.reshape((n // chunk, chunk) + dy.shape[1:])

    def body(acc, xd):
        return jax.tree.map(jnp.add, acc, _wgrad_parts(xd[0], xd[1], m)), None

    dtype = jnp.result_type(x.dtype, dy.dtype)
    a = m + 2
    acc0 = [[jnp.zeros(w.shape[2:], dtype) for _ in range(a)] for _ in range(a)]
    du, _ = lax.scan(body, acc0, (xs, dys))
    return _filter_grad(du, m).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _planned_conv(x, w, plan, infer):
    # The primal: what runs when the convolution is not differentiated (sampling, evaluation).
    return _fwd_method(infer, x, w)


def _planned_fwd(x, w, plan, infer):
    return _fwd_method(plan[0], x, w), (x, w)


def _planned_bwd(plan, infer, res, dy):
    x, w = res
    if plan[2] != "xla" and plan[0] != "xla":
        # The Winograd weight gradient transforms x as the forward did; without the barrier XLA
        # shares that transform with the forward's and keeps it alive from the forward pass to
        # the backward (4x x's size for F(2,3): +110 MiB of temporaries in the CIFAR10 step at
        # batch 32). Tied to dy, it is computed again when the gradient needs it.
        x, dy = lax.optimization_barrier((x, dy))
    dx = _dx_method(plan[1], dy, w)
    dw = _wgrad_method(plan[2], x, dy, w)
    return dx, dw


_planned_conv.defvjp(_planned_fwd, _planned_bwd)


def conv3x3(
    x: jax.Array,
    w: jax.Array,
    plan: Tuple[str, str, str] = ("xla", "xla", "xla"),
    infer: Optional[str] = None,
) -> jax.Array:
    """3x3 stride-1 'SAME' convolution NHWC x HWIO with per-direction methods.

    Args:
      x: ``[N, H, W, Cin]``.
      w: ``[3, 3, Cin, Cout]``.
      plan: ``(forward, input gradient, weight gradient)`` methods, each in `METHODS`, used when
        the convolution is differentiated (``jax.grad``/``jax.vjp``: the train step). The all-XLA
        plan is plain ``lax.conv_general_dilated`` (XLA's own autodiff, no custom_vjp).
      infer: the forward method when the convolution is *not* differentiated (sampling,
        evaluation; a ``custom_vjp`` runs its primal then); ``None``: ``plan[0]``. Forward-only
        programs can afford a method whose backward would cost too much memory or compile time.

    Returns:
      ``[N, H, W, Cout]``.
    """
    plan = tuple(plan)
    infer = plan[0] if infer is None else infer
    if len(plan) != 3 or any(p not in METHODS for p in plan + (infer,)):
        raise ValueError(
            f"plan must be 3 methods from {METHODS} (and infer one), got {plan!r}, {infer!r}"
        )
    if w.shape[:2] != (3, 3):
        raise ValueError(f"conv3x3 needs a [3, 3, Cin, Cout] kernel, got {w.shape}")
    if plan == ("xla", "xla", "xla") and infer == "xla":
        return xla_conv(x, w)
    return _planned_conv(x, w, plan, infer)


# ----------------------------------------------------------------------------------------------
# 'auto': a fixed table measured on the benchmark CPU (benchmarks/conv_select.py; RESULTS.md).
# ----------------------------------------------------------------------------------------------
def auto_active(dtype, backend: Optional[str] = None) -> bool:
    """Whether ``conv_impl='auto'`` chooses per layer: only on the CPU backend with float32
    compute (nothing was measured to help on GPU/TPU, whose convolution libraries are fast, nor
    for bfloat16); elsewhere every ``auto`` rule is XLA's convolution. The gate of the training
    plan (`auto_choice`) and of the forward-only rule `infer_method` (the U-Net's and the FID
    Inception network's)."""
    backend = jax.default_backend() if backend is None else backend
    return backend == "cpu" and jnp.dtype(dtype) == jnp.float32


def enough_channels(cin: int, cout: int) -> bool:
    """Whether a layer has the channels (`_MIN_CHANNELS`, in and out) for ``auto`` to replace
    XLA's convolution by matmul-based methods; used by `_cpu_rule` and `infer_method`."""
    return min(cin, cout) >= _MIN_CHANNELS


def auto_choice(
    shape: Tuple[int, int, int, int], cout: int, dtype, backend: Optional[str] = None
) -> Tuple[str, str, str]:
    """The plan ``conv_impl='auto'`` uses for an input of ``shape`` (NHWC) and ``cout`` outputs:
    XLA unless `auto_active`; then `_cpu_rule`."""
    if not auto_active(dtype, backend):
        return PLANS["xla"]
    _, h, w, cin = shape
    return _cpu_rule(h, w, cin, cout)


#: Fewer channels than this: XLA's conv on CPU (the RGB in/out convs, and small test models,
#: whose compile time would grow with Winograd's many small kernels for little gain).
_MIN_CHANNELS = 64


#: The smallest layer (pixels, height and width) where `_cpu_rule` takes F(4,3) (RESULTS.md §17).
F43_MIN_SIZE = 16


#: The plan of `_cpu_rule` for layers under 16x16 (8x8 and 4x4 in the CIFAR10 U-Net): F(2,3) in
#: all three directions.
SMALL_LAYER_PLAN: Tuple[str, str, str] = ("w2", "w2", "w2")


def _cpu_rule(h: int, w: int, cin: int, cout: int) -> Tuple[str, str, str]:
    """The CPU rule of ``conv_impl='auto'`` (benchmarks/RESULTS.md, "Per-layer conv methods"
    and §17): fewer than 64 channels in or out: XLA's conv; at least 16x16 pixels: F(4,3) in all
    three directions; smaller layers: F(2,3) in all three directions (`SMALL_LAYER_PLAN`).

    With the transforms as C++ custom calls (`winograd_ffi`), F(4,3) at >= 16x16 ran the CIFAR10
    train step 1.17x faster than F(2,3) at batch 8 (1.067 vs 1.245 s, medians of 6 alternating
    rounds) and 1.11x at batch 32, compiling in 19 s against 16 s; with the pure-JAX transforms
    it had lost (0.92x, and 2.2x the compile time: each F(4,3) convolution was ~75 XLA kernels).
    Under 16x16, F(2,3) gradients replaced XLA's (RESULTS.md §21, 2026-12-03): the train step
    with ``DDPM_KEEP_FREED_MEMORY=sync`` was faster in 10 of 10 alternating rounds at batch
    8 (medians 1.104 vs 1.191 s, with `W2_WGRAD_MAX_TILE_ROWS`) and within noise at batch 32
    (5.35 vs 5.23 s; an earlier run 4.49 vs 5.02 s), with the same XLA temporaries; F(4,3)
    there ran within noise of F(2,3). F(4,3)'s fp32 error is ~10x F(2,3)'s (module docstring; still
    ~1e-6..5e-6 relative on the U-Net).
    """
    if not enough_channels(cin, cout):
        return PLANS["xla"]
    if min(h, w) < F43_MIN_SIZE:
        return SMALL_LAYER_PLAN
    return PLANS["winograd4"]


def auto_infer_choice(
    shape: Tuple[int, int, int, int], cout: int, dtype, backend: Optional[str] = None
) -> str:
    """The forward method ``conv_impl='auto'`` uses for a U-Net 3x3 stride-1 'SAME' convolution
    of an input of ``shape`` ``[N, H, W, Cin]`` (NHWC) with ``cout`` outputs when it is not
    differentiated (sampling, evaluation): `infer_method` with kernel (3, 3), stride 1, padding 1
    (``'xla'``, ``'w2'`` or ``'w4'``)."""
    _, h, w, cin = shape
    return infer_method((3, 3), 1, 1, h, w, cin, cout, dtype, backend)


def as_pair(p) -> Tuple[int, int]:
    """``k`` or ``(kh, kw)`` -> ``(kh, kw)`` (kernel sizes, paddings)."""
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def infer_method(
    kernel_hw,
    stride: int,
    padding,
    h: int,
    w: int,
    cin: int,
    cout: int,
    dtype,
    backend: Optional[str] = None,
) -> str:
    """The one rule of ``conv_impl='auto'`` for a convolution that is not differentiated, shared
    by the U-Net (`auto_infer_choice`) and the FID Inception network
    (`diffusion.metrics.inception.network.conv_method`).

    Args:
      kernel_hw: ``(kh, kw)`` (or an int for a square kernel).
      stride: the stride, the same along both axes.
      padding: per-axis symmetric padding, an int or ``(ph, pw)`` (1 for a 3x3 'SAME' conv, 0 for
        'VALID').
      h, w: the input's height and width (``x [N, h, w, cin]``, NHWC).
      cin, cout: input and output channels (kernel ``[kh, kw, cin, cout]``, HWIO).
      dtype: the compute dtype.
      backend: ``jax.default_backend()`` when ``None``.

    Returns one of
      ``'xla'``  ``lax.conv_general_dilated``;
      ``'w2'`` / ``'w4'``  Winograd F(2x2,3x3) / F(4x4,3x3) (`winograd_conv`; a 3x3 stride-1
                 conv with padding 1, or 0 computed as the padding-1 result cropped by one pixel);
      ``'dot'``  a 1x1 stride-1 unpadded conv as one ``[N*h*w, cin] @ [cin, cout]`` matmul;
      ``'taps'`` a 3x3 stride-2 unpadded conv as the sum of 9 matmuls of strided input slices.

    The rule (measured on the benchmark CPU: benchmarks/RESULTS.md §17, "Per-layer conv methods"
    and "FID Inception convolutions"): XLA unless `auto_active` (CPU backend, float32); a 1x1
    stride-1 conv is ``'dot'`` at any channel count; XLA when not `enough_channels` (< 64 in or
    out); a 3x3 stride-1 conv is F(4,3) when ``min(h, w) >= F43_MIN_SIZE`` (16) and ``h`` and
    ``w`` are multiples of 4 (one F(4,3) tile covers 4x4 outputs), else F(2,3); a 3x3 stride-2
    unpadded conv is ``'taps'``; XLA for every other shape (1x7 / 7x1 / 1x3 / 3x1 / 5x5, strided
    padded convs). The U-Net's 3x3 layers (32x32 .. 4x4 in CIFAR10) get F(4,3) at >= 16x16 and
    F(2,3) below; the Inception's 3x3 stride-1 layers (147/73/35/8 pixels) all get F(2,3): at its
    35x35 layers, not multiples of 4, F(4,3) measured 197 ms against F(2,3)'s 76 ms (64->96).

    The training plan of the U-Net (`_cpu_rule`, three directions) is a separate rule; its
    forward equals this one on every layer whose sides are multiples of 4 (all U-Net configs here).
    """
    if not auto_active(dtype, backend):
        return "xla"
    kh, kw = as_pair(kernel_hw)
    ph, pw = as_pair(padding)
    if (kh, kw) == (1, 1) and stride == 1 and (ph, pw) == (0, 0):
        return "dot"  # (not a convolution: one matmul at any channel count)
    if not enough_channels(cin, cout):
        return "xla"
    if (kh, kw) == (3, 3) and stride == 1 and ph == pw and ph in (0, 1):
        m4 = _MATS["w4"][0]
        if min(h, w) >= F43_MIN_SIZE and h % m4 == 0 and w % m4 == 0:
            return "w4"
        return "w2"
    if (kh, kw) == (3, 3) and stride == 2 and (ph, pw) == (0, 0):
        return "taps"
    return "xla"


def resolve_infer(conv_impl: str, shape, cout: int, dtype) -> Optional[str]:
    """``config.runtime.conv_impl`` -> the forward method when not differentiated (None: the
    plan's own forward)."""
    check_conv_impl(conv_impl)
    if conv_impl == "auto":
        return auto_infer_choice(tuple(shape), cout, dtype)
    return None


def resolve_plan(conv_impl: str, shape, cout: int, dtype) -> Tuple[str, str, str]:
    """``config.runtime.conv_impl`` -> the per-direction plan for one layer."""
    check_conv_impl(conv_impl)
    if conv_impl == "auto":
        return auto_choice(tuple(shape), cout, dtype)
    return PLANS[conv_impl]


def _is_conv3x3_same(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation,
    rhs_dilation,
    dimension_numbers,
    feature_group_count,
) -> bool:
    if lhs.ndim != 4 or rhs.shape[:2] != (3, 3) or feature_group_count != 1:
        return False
    if tuple(window_strides) != (1, 1):
        return False
    if lhs_dilation not in (None, (1, 1), [1, 1]) or rhs_dilation not in (None, (1, 1), [1, 1]):
        return False
    if not (
        padding == "SAME"
        or (not isinstance(padding, str) and [tuple(p) for p in padding] == [(1, 1), (1, 1)])
    ):
        return False
    want = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DN)
    return dimension_numbers is not None and (dimension_numbers == want or dimension_numbers == _DN)


def _conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    *,
    conv_impl: str = "auto",
    **kwargs,
):
    """Drop-in for ``lax.conv_general_dilated`` (``nn.Conv(conv_general_dilated=...)``): 3x3
    stride-1 'SAME' NHWC/HWIO convolutions go through `conv3x3` with the plan `resolve_plan`
    picks for ``conv_impl``; anything else (strided, other kernels, ...) goes to XLA."""
    if (
        precision is None
        and not kwargs
        and _is_conv3x3_same(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
        )
    ):
        return conv3x3(
            lhs,
            rhs,
            resolve_plan(conv_impl, lhs.shape, rhs.shape[-1], lhs.dtype),
            resolve_infer(conv_impl, lhs.shape, rhs.shape[-1], lhs.dtype),
        )
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        **kwargs,
    )


@functools.lru_cache(maxsize=None)
def _conv_fn(conv_impl: str):
    return functools.partial(_conv_general_dilated, conv_impl=conv_impl)


def conv_general_dilated_for(conv_impl: str):
    """The ``conv_general_dilated`` to give ``flax.linen.Conv`` for ``conv_impl`` (None for
    ``'xla'``: nn.Conv then calls ``lax.conv_general_dilated`` itself, exactly as before)."""
    check_conv_impl(conv_impl)
    if conv_impl == "xla":
        return None
    return _conv_fn(conv_impl)  # one object per value (module attributes compare equal)


__all__ = [
    "IMPLS",
    "as_pair",
    "METHODS",
    "PLANS",
    "check_conv_impl",
    "xla_conv",
    "winograd_conv",
    "conv3x3",
    "auto_active",
    "enough_channels",
    "auto_choice",
    "auto_infer_choice",
    "infer_method",
    "resolve_plan",
    "resolve_infer",
    "conv_general_dilated_for",
]
