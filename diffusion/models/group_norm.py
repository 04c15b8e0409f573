"""GroupNorm (Wu & He 2018) with its statistics computed as per-channel column sums.

The DDPM U-Net normalises every ResBlock / attention input with GroupNorm(32 groups, eps 1e-6)
(``tf.contrib.layers.group_norm`` in the released code). ``flax.linen.GroupNorm`` computes the
statistics as one reduction of ``x`` reshaped to ``[B, H, W, G, C/G]`` over ``(H, W, C/G)``. XLA
CPU emits that reduction as a strided, poorly vectorised loop: in the CIFAR10 U-Net's forward
pass its reductions took ~9 % of the time (benchmarks/RESULTS.md). Here the same statistics are
computed as a column sum over ``(H, W)`` that keeps the contiguous channel axis (``[B, C]``, which
XLA vectorises along ``C``) followed by a tiny sum over the ``C/G`` channels of each group: the
same numbers up to fp32 summation order (tested against ``flax.linen.GroupNorm`` and a float64
NumPy reference), 2-3x faster on CPU. Only the undifferentiated forward (sampling, evaluation)
uses it. Under ``jax.grad`` on CPU with float32 NHWC data, the forward and a closed-form backward
are C++ custom calls (``group_norm_cpu.cc``, built by `cpu_kernels`; 3 + 2 passes over the
activation, statistics accumulated in float64; the CIFAR10 train step 1.08x faster at batch 8 and
1.14x at batch 32, benchmarks/RESULTS.md §18); elsewhere JAX's autodiff of flax's GroupNorm.

As in the released code (``tf.nn.moments``), the variance is the two-pass ``E[(x - mean)^2]``,
not ``E[x^2] - mean^2``, and the statistics are float32 whatever the compute dtype.
The parameters are ``scale`` and ``bias``, each ``[C]``, like ``flax.linen.GroupNorm``'s, so
parameter trees and checkpoints are the same with either module.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models import cpu_kernels

Dtype = Any


def _stats(xs: jax.Array, num_groups: int, epsilon: float):
    """Per-channel ``(mean, 1/sqrt(var + eps))`` of each channel's group, ``[B, C]`` float32:
    column sums over the spatial axes (contiguous channel axis kept), then over each group's
    ``C/G`` channels; the two-pass variance."""
    b, c = xs.shape[0], xs.shape[-1]
    cg = c // num_groups
    axes = tuple(range(1, xs.ndim - 1))
    count = cg
    for a in axes:
        count *= xs.shape[a]

    def per_group(col_sums):  # [B, C] sums -> [B, C]: each channel gets its group's mean
        g = col_sums.reshape(b, num_groups, cg).sum(axis=-1) / count
        return jnp.repeat(g, cg, axis=1)

    mean = per_group(jnp.sum(xs, axis=axes))
    d = xs - _bcast(mean, xs.ndim)
    var = per_group(jnp.sum(d * d, axis=axes))
    return mean, jax.lax.rsqrt(var + epsilon)


def _bcast(v: jax.Array, ndim: int) -> jax.Array:
    """``[B, C]`` -> ``[B, 1, ..., 1, C]`` (``ndim`` dims)."""
    return v.reshape((v.shape[0],) + (1,) * (ndim - 2) + (v.shape[1],))


def group_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    num_groups: int,
    epsilon: float,
    out_dtype: Dtype = None,
) -> jax.Array:
    """``y = (x - mean_g) / sqrt(var_g + eps) * scale + bias`` (Wu & He 2018, Eq. 1-2).

    Args:
      x: ``[B, ..., C]`` (NHWC: ``[B, H, W, C]``); ``C`` divisible by ``num_groups``.
      scale: ``[C]`` (gamma).
      bias: ``[C]`` (beta).
      num_groups: ``G``; the statistics of each ``(b, g)`` are over all non-batch positions and
        the ``C/G`` channels of group ``g``.
      epsilon: added to the variance.
      out_dtype: dtype of the result (default: that of ``x``).

    Returns:
      ``[B, ..., C]``; computed in float32 (at least). Not differentiated: the column-sum
      statistics. Under ``jax.grad``/``jax.vjp``: flax's GroupNorm and its autodiff (`_gn_fwd`).
    """
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {c} channels are not divisible by {num_groups} groups")
    out_dtype = x.dtype if out_dtype is None else jnp.dtype(out_dtype)
    return _gn(x, scale, bias, num_groups, float(epsilon), out_dtype)


def _gn_flax(x, scale, bias, num_groups, epsilon, out_dtype):
    """``flax.linen.GroupNorm`` (two-pass variance) applied with the given parameters: the
    formulation whose autodiff the training step differentiates (see `_gn_fwd`)."""
    mod = nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        use_fast_variance=False,
        dtype=out_dtype,
        param_dtype=scale.dtype,
    )
    return mod.apply({"params": {"scale": scale, "bias": bias}}, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gn(x, scale, bias, num_groups, epsilon, out_dtype):
    # The primal, run when not differentiated: column-sum statistics.
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xs = x.astype(stat_dtype)
    mean, inv = _stats(xs, num_groups, epsilon)
    mul = inv * scale.astype(stat_dtype)  # [B, C]
    y = (xs - _bcast(mean, x.ndim)) * _bcast(mul, x.ndim) + bias.astype(stat_dtype)
    return y.astype(out_dtype)


def _kernel_ok(x, scale, bias, out_dtype) -> bool:
    """Whether the C++ GroupNorm custom calls (`cpu_kernels`, ``group_norm_cpu.cc``) serve this
    call: NHWC float32 data, parameters and output, on the CPU backend, kernels built."""
    f32 = jnp.dtype(jnp.float32)
    return (
        x.ndim == 4
        and all(jnp.dtype(a.dtype) == f32 for a in (x, scale, bias))
        and jnp.dtype(out_dtype) == f32
        and cpu_kernels.usable(jnp.float32)
    )


def _kernel_fwd(x, scale, bias, num_groups, epsilon):
    """``(y, mean [B, G], inv [B, G])`` by the C++ forward (statistics accumulated in float64)."""
    stat = jax.ShapeDtypeStruct((x.shape[0], num_groups), jnp.float32)
    return jax.ffi.ffi_call(
        "ddpm_group_norm_fwd",
        (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat),
        vmap_method="sequential",  # under jax.vmap: one call per mapped element
    )(x, scale, bias, groups=np.int64(num_groups), eps=np.float32(epsilon))


def _gn_fwd(x, scale, bias, num_groups, epsilon, out_dtype):
    # Under differentiation. On CPU with float32 NHWC data: the C++ forward, keeping (x, scale,
    # mean, inv) for its closed-form backward (benchmarks/RESULTS.md §18). Otherwise JAX's
    # autodiff of flax's GroupNorm, exactly what the train step computed before. (The
    # column-sum forward, differentiated by JAX (2,307 MiB) or by a JAX closed-form backward
    # (2,421 MiB), did not run the CIFAR10 train step faster than flax's and raised XLA's
    # temporary memory of the batch-32 step from 2,032 MiB.)
    if _kernel_ok(x, scale, bias, out_dtype):
        y, mean, inv = _kernel_fwd(x, scale, bias, num_groups, epsilon)
        return y, (x, scale, mean, inv)
    y, vjp = jax.vjp(
        lambda x_, s_, b_: _gn_flax(x_, s_, b_, num_groups, epsilon, out_dtype), x, scale, bias
    )
    return y, vjp


def _gn_bwd(num_groups, epsilon, out_dtype, res, dy):
    if isinstance(res, tuple):  # the C++ forward's residuals
        x, scale, mean, inv = res
        vec = jax.ShapeDtypeStruct(scale.shape, scale.dtype)
        # dx is written over dy (same shape; each element is read before it is written): no
        # new activation-sized buffer where dy is dead, an XLA copy where it is not.
        return jax.ffi.ffi_call(
            "ddpm_group_norm_bwd",
            (jax.ShapeDtypeStruct(x.shape, x.dtype), vec, vec),
            input_output_aliases={4: 0},
            vmap_method="sequential",
        )(x, scale, mean, inv, dy.astype(jnp.float32))
    return res(dy)


_gn.defvjp(_gn_fwd, _gn_bwd)


class GroupNorm(nn.Module):
    """GroupNorm over the last (channel) axis with learned ``scale`` (ones) and ``bias`` (zeros).

    Attributes:
      num_groups: ``G`` (32 in the DDPM U-Net).
      epsilon: variance epsilon (1e-6 in the released code).
      dtype: output dtype (statistics are float32 regardless).
      param_dtype: dtype of ``scale`` and ``bias``.

    Call: ``x [B, H, W, C] -> [B, H, W, C]`` (`group_norm`).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C]`` -> normalised ``[B, H, W, C]`` in ``dtype``."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)
