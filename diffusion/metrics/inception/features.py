"""The jitted feature functions of the FID Inception networks: images in 0..255 ->
pool3 features (:func:`make_feature_fn`, for FID / KID) or pool3 features and logits in one pass
(:func:`make_feature_logits_fn`, for the Inception Score as well; see
:func:`diffusion.metrics.fid.inception_score`)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from diffusion.metrics.inception.network import (
    FIDInceptionV3,
    InceptionV3WithLogits,
    check_inception_conv_impl,
    preprocess,
)
from diffusion.metrics.inception.weights import load_inception_params


def make_feature_fn(
    params: Optional[Dict[str, Any]] = None, conv_impl: str = "auto"
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """Return a jitted ``fn(images) -> features``.

    Args:
      params: tree from :func:`load_inception_params` (loaded with defaults when ``None``).
      conv_impl: how the convolutions are computed (`network.conv_method`): ``'auto'`` (measured
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
