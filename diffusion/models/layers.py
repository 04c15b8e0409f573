"""Building blocks of the DDPM U-Net.

Implements the layers of Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models",
Appendix B, as released in the authors' TensorFlow code (``diffusion_tf/models/unet.py`` and
``diffusion_tf/nn.py``): the sinusoidal timestep embedding, the Wide-ResNet style residual block
with a timestep projection, the single-head self-attention block, and the 2x resampling layers.

All tensors are NHWC. Parameters are created in ``param_dtype`` (float32 by default); convolutions,
dense layers and the attention products compute in ``dtype`` (e.g. bfloat16), while GroupNorm
statistics and the attention softmax are computed in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.conv import conv_general_dilated_for
from diffusion.models.group_norm import GroupNorm

Dtype = Any
Initializer = Callable[..., jax.Array]

#: GroupNorm settings of the released code (``tf.contrib.layers.group_norm`` defaults there).
NUM_GROUPS = 32
GN_EPSILON = 1e-6


# ----------------------------------------------------------------------------------------------
# Initialisers
# ----------------------------------------------------------------------------------------------
def default_init(scale: float = 1.0) -> Initializer:
    """Kernel initialiser of the released code: ``variance_scaling(scale, 'fan_avg', 'uniform')``.

    Mirrors ``diffusion_tf/nn.py:default_init``: a scale of exactly 0 is replaced by 1e-10, which is
    how the "zero" layers (second conv of a ResBlock, attention ``proj_out``, the output conv) are
    initialised to (almost) zero while keeping a well-defined variance-scaling distribution.

    Args:
      scale: variance scale; 0 means 1e-10.

    Returns:
      A JAX initialiser ``(key, shape, dtype) -> array``. For a conv kernel ``[kh, kw, in, out]``
      fan_avg = kh*kw*(in+out)/2, for a dense kernel ``[in, out]`` fan_avg = (in+out)/2.
    """
    scale = 1e-10 if scale == 0 else scale
    return jax.nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def zero_init() -> Initializer:
    """Initialiser of the "zero" layers: ``default_init(0.0)`` i.e. variance scale 1e-10."""
    return default_init(0.0)


def nonlinearity(x: jax.Array) -> jax.Array:
    """Swish / SiLU, ``x * sigmoid(x)``, the only nonlinearity of the DDPM U-Net. Any shape."""
    return nn.swish(x)


def _conv(
    features: int,
    *,
    kernel: int = 3,
    stride: int = 1,
    init_scale: float = 1.0,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    conv_impl: str = "xla",
) -> nn.Conv:
    """A ``kernel x kernel`` conv with 'SAME' padding (TF convention), bias 0 (``nn.conv2d``).

    ``conv_impl`` (`diffusion.models.conv.IMPLS`) only chooses how 3x3 stride-1 convolutions are
    computed (XLA's conv or Winograd + matmuls); the parameters (``kernel`` HWIO, ``bias``) are the
    same whichever is used. Strided convs always use XLA's conv.
    """
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
        conv_general_dilated=conv_general_dilated_for(conv_impl),
    )


def _nin(
    features: int, *, init_scale: float = 1.0, dtype: Dtype, param_dtype: Dtype, name: str
) -> nn.Dense:
    """A 1x1 conv ("network in network", ``nn.nin``) = Dense over the channel axis, bias 0."""
    return nn.Dense(
        features,
        kernel_init=default_init(init_scale),
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _group_norm(*, dtype: Dtype, param_dtype: Dtype, name: str) -> GroupNorm:
    """GroupNorm(32 groups, eps 1e-6) with learned scale/bias; statistics in float32.

    The two-pass variance E[(x - mean)^2] is used (as ``tf.nn.moments`` in the released code), not the
    faster E[x^2] - mean^2, which loses precision on large-mean activations. `GroupNorm` has the
    parameters of ``flax.linen.GroupNorm`` and computes its statistics as channel column sums
    (faster on CPU, see `diffusion.models.group_norm`).
    """
    return GroupNorm(
        num_groups=NUM_GROUPS,
        epsilon=GN_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


# ----------------------------------------------------------------------------------------------
# Timestep embedding
# ----------------------------------------------------------------------------------------------
def get_timestep_embedding(timesteps: jax.Array, embedding_dim: int) -> jax.Array:
    """Sinusoidal timestep embedding (DDPM Appendix B; ``diffusion_tf/nn.py``; Transformer PE).

    With ``half = embedding_dim // 2`` and ``f_i = exp(-i * ln(10000) / (half - 1))``,
    ``i = 0..half-1``, returns ``concat[sin(t * f), cos(t * f)]`` using the raw (integer, code-index)
    timestep ``t`` cast to float32; zero-padded by one column when ``embedding_dim`` is odd.

    Args:
      timesteps: ``[B]`` integer (or float) timesteps.
      embedding_dim: output width ``D`` (the U-Net uses ``ch``); must be >= 4.

    Returns:
      ``[B, D]`` float32 embedding.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {timesteps.shape}")
    if embedding_dim < 4:
        raise ValueError(f"embedding_dim must be >= 4, got {embedding_dim}")
    half = embedding_dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """Timestep MLP of the DDPM U-Net: sinusoid(ch) -> Dense(4ch) -> swish -> Dense(4ch).

    Attributes:
      ch: base channel count; the sinusoid has ``ch`` dims, the MLP ``4 * ch``.

    Call: ``t [B] int -> temb [B, 4ch]`` (in ``dtype``).
    """

    ch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        """``t [B]`` -> ``[B, 4ch]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = get_timestep_embedding(t, self.ch)
        emb = _nin(4 * self.ch, name="dense0", **kw)(emb)
        emb = _nin(4 * self.ch, name="dense1", **kw)(nonlinearity(emb))
        return emb


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Residual block of the DDPM U-Net (``resnet_block`` in the released code).

    ``h = conv3x3(swish(GN(x)))``; ``h += Dense(swish(temb))[:, None, None, :]``;
    ``h = conv3x3_zero(dropout(swish(GN(h))))``; ``x`` goes through a 1x1 conv (NIN) when the channel
    count changes; returns ``x + h``.

    Attributes:
      out_ch: output channels (``None``: same as input).
      dropout: dropout rate before the second conv; uses the ``'dropout'`` RNG stream.
      conv_impl: how the 3x3 convs are computed (`diffusion.models.conv.IMPLS`).

    Call: ``(x [B,H,W,C], temb [B,E], train: bool) -> [B,H,W,out_ch]``.
    """

    out_ch: Optional[int] = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        """``x [B,H,W,C]``, ``temb [B,E]`` -> ``[B,H,W,out_ch]``; dropout active iff ``train``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c_in = x.shape[-1]
        out_ch = c_in if self.out_ch is None else self.out_ch
        h = nonlinearity(_group_norm(name="norm1", **kw)(x))
        h = _conv(out_ch, name="conv1", conv_impl=self.conv_impl, **kw)(h)
        h = h + _nin(out_ch, name="temb_proj", **kw)(nonlinearity(temb))[:, None, None, :]
        h = nonlinearity(_group_norm(name="norm2", **kw)(h))
        h = nn.Dropout(rate=self.dropout, rng_collection="dropout")(h, deterministic=not train)
        h = _conv(out_ch, init_scale=0.0, name="conv2", conv_impl=self.conv_impl, **kw)(h)
        if c_in != out_ch:
            x = _nin(out_ch, name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention block (``attn_block`` in the released code).

    ``h = GN(x)``; ``q, k, v = 1x1(h)``; ``w = softmax_{over all H*W keys}(q . k / sqrt(C))``;
    ``h = w @ v``; returns ``x + proj_out_zero(h)``.

    Call: ``(x [B,H,W,C]) -> [B,H,W,C]``. The softmax is computed in float32.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B,H,W,C]`` -> ``[B,H,W,C]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        h = _group_norm(name="norm", **kw)(x)
        q = _nin(c, name="q", **kw)(h).reshape(b, hgt * wid, c)
        k = _nin(c, name="k", **kw)(h).reshape(b, hgt * wid, c)
        v = _nin(c, name="v", **kw)(h).reshape(b, hgt * wid, c)
        w = jnp.einsum("bqc,bkc->bqk", q, k) * (c**-0.5)
        w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
        h = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hgt, wid, c)
        h = _nin(c, init_scale=0.0, name="proj_out", **kw)(h)
        return x + h


class Downsample(nn.Module):
    """2x downsampling: conv3x3 stride 2 'SAME' (TF padding: 0 before, 1 after on even sizes) if
    ``with_conv``, else 2x2 average pooling.

    Call: ``x [B,H,W,C] -> [B,H/2,W/2,C]``.
    """

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B,H,W,C]`` -> ``[B,H/2,W/2,C]``."""
        if self.with_conv:
            return _conv(
                x.shape[-1], stride=2, name="conv", dtype=self.dtype, param_dtype=self.param_dtype
            )(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling followed by a conv3x3 if ``with_conv``.

    (The released code's ``tf.image.resize(..., NEAREST, align_corners=True)`` at exactly 2x is the
    same as repeating every pixel twice.)

    Call: ``x [B,H,W,C] -> [B,2H,2W,C]``.
    """

    with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B,H,W,C]`` -> ``[B,2H,2W,C]``."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = _conv(
                x.shape[-1],
                name="conv",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                conv_impl=self.conv_impl,
            )(x)
        return x
