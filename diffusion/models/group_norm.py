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
uses it: under ``jax.grad`` the module differentiates flax's own formulation (see `_gn_fwd`).

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


def _gn_fwd(x, scale, bias, num_groups, epsilon, out_dtype):
    # Under differentiation: JAX's autodiff of flax's GroupNorm, exactly what the train step
    # computed before. The column-sum forward, differentiated by JAX (2,307 MiB) or by the
    # closed-form GroupNorm backward (two [B, C] column sums and one elementwise pass; 2,421 MiB),
    # did not run the CIFAR10 train step faster than this and raised XLA's temporary memory of the
    # batch-32 step from 2,032 MiB (benchmarks/RESULTS.md), so only the forward-only path
    # (sampling, evaluation) uses the column sums.
    y, vjp = jax.vjp(
        lambda x_, s_, b_: _gn_flax(x_, s_, b_, num_groups, epsilon, out_dtype), x, scale, bias
    )
    return y, vjp


def _gn_bwd(num_groups, epsilon, out_dtype, vjp, dy):
    return vjp(dy)


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
