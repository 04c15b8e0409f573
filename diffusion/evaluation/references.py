"""FID reference statistics: a data split's Inception features, computed once per split and
cached next to the data (or under ``<workdir>/eval`` when the data dir is not writable) and in
memory (`FidReferences`); `compute_fid_kid` scores features against them."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from diffusion import io
from diffusion.evaluation import settings as S
from diffusion.metrics import fid as fid_lib
from diffusion.progress import Progress

__all__ = ["FidReferences", "compute_fid_kid", "reference_cache_dir", "to_rgb", "with_progress"]


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Grayscale ``[..., 1]`` → 3 channels (repeated) for Inception; RGB unchanged."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def with_progress(feature_fn: Callable, total: int, what: str) -> Callable:
    """Wraps ``feature_fn`` to log "<what>: Inception features k/total images (rate, ETA)"."""
    prog = Progress(f"{what}: Inception features", total)

    def fn(batch):
        out = np.asarray(feature_fn(batch))
        prog.update(len(batch))
        return out

    return fn


def compute_fid_kid(gen_features: np.ndarray, ref: fid_lib.ReferenceStatistics) -> Dict[str, Any]:
    """FID and KID of generated features ``[N, d]`` against a reference.

    Returns ``{'fid', 'kid', 'kid_se', 'num_gen', 'num_ref', 'kid_subset_size',
    'kid_num_subsets'}`` (Python floats/ints). FID uses the exact N×N_ref route when
    ``max(N, N_ref) <= d``, else the d×d statistics (sqrtm)."""
    g = np.asarray(gen_features, np.float64)
    n, n_ref, dim = len(g), len(ref.features), g.shape[1]
    if max(n, n_ref) <= dim:
        fid = fid_lib.frechet_distance_from_features(g, ref.features)
    else:
        fid = fid_lib.frechet_distance(*fid_lib.compute_statistics(g), ref.mu, ref.sigma)
    kid, kid_se = fid_lib.kernel_inception_distance(
        g, ref.features, num_subsets=S.KID_NUM_SUBSETS, subset_size=S.KID_SUBSET_SIZE
    )
    return {
        "fid": float(fid),
        "kid": float(kid),
        "kid_se": float(kid_se),
        "num_gen": int(n),
        "num_ref": int(n_ref),
        "kid_subset_size": int(min(n, n_ref, S.KID_SUBSET_SIZE)),
        "kid_num_subsets": S.KID_NUM_SUBSETS,
    }


def reference_cache_dir(
    data_dir: Optional[str], network: str, fallback: Optional[str] = None
) -> str:
    """The writable FID reference cache, ``<root>/fid_stats/<network>[/p<process>]`` with root the
    data dir (``data_dir``, else `diffusion.data.default_data_dir`), else ``fallback``; raises
    OSError when neither is writable."""
    from diffusion.data import default_data_dir

    sub = ["fid_stats", network] + ([f"p{jax.process_index()}"] if jax.process_index() else [])
    base = io.absolute(data_dir) if data_dir else default_data_dir()
    roots = [base] + ([fallback] if fallback else [])
    for root in roots:
        try:
            return io.probe_writable(io.join(root, *sub), what="FID reference cache")
        except OSError:
            continue
    raise OSError(f"None of {roots} is writable for the FID reference cache")


class FidReferences:
    """The FID reference statistics of one run, per split.

    Args:
      config: the run's config (``data`` and ``eval.fid_split`` sizes).
      eval_dir: ``<workdir>/eval``, the fallback cache root.
      network: the feature network's name (a cache key).
      feature_batch_size: images per Inception batch.
      feature_fn: ``() -> (uint8 [B, H, W, 3] -> features [B, d])``, called when first needed.
      timed: ``(stage, t0) -> None`` records the wall time spent.
    """

    def __init__(
        self,
        config,
        eval_dir: str,
        network: str,
        feature_batch_size: int,
        feature_fn: Callable[[], Callable],
        timed: Callable[[str, float], None],
    ):
        self.config, self.eval_dir, self.network = config, eval_dir, network
        self.feature_batch_size, self.feature_fn, self.timed = feature_batch_size, feature_fn, timed
        self._refs: Dict[str, Tuple[str, fid_lib.ReferenceStatistics]] = {}

    def get(self, split: str) -> Tuple[str, fid_lib.ReferenceStatistics]:
        """``(reference split, statistics)`` for FID against ``split``: the split actually read
        (`settings.fid_reference_split`) and its statistics, cached next to the data (or under
        ``<workdir>/eval``) and in memory."""
        if split not in self._refs:
            ref_split = S.fid_reference_split(self.config, split)
            self._refs[split] = (ref_split, self.load(ref_split))
        return self._refs[split]

    def cache_dir(self) -> str:
        """The writable cache directory: under the data dir, else under ``eval_dir``."""
        return reference_cache_dir(self.config.data.data_dir, self.network, self.eval_dir)

    def load(self, split: str) -> fid_lib.ReferenceStatistics:
        """The statistics of ``split`` (computed from the images, or read from the cache)."""
        from diffusion.data import load_split

        d = self.config.data
        t0 = time.time()
        images = load_split(d.dataset, split, data_dir=d.data_dir, image_size=d.image_size)
        if len(images) < 2:
            raise ValueError(
                f"config.eval.fid_split: {split!r} of {d.dataset!r} has "
                f"{len(images)} image(s); FID needs at least 2"
            )
        cache_dir = self.cache_dir()
        logging.info(
            "FID reference: %d images of %s/%s at %dpx (cache %s)",
            len(images),
            d.dataset,
            split,
            d.image_size,
            cache_dir,
        )
        ref = fid_lib.reference_statistics(
            f"{d.dataset}_{d.image_size}px",
            split,
            with_progress(self.feature_fn(), len(images), f"reference {d.dataset}/{split}"),
            images=to_rgb(images),
            cache_dir=cache_dir,
            batch_size=self.feature_batch_size,
            network=self.network,
        )
        logging.info(
            "FID reference statistics ready: N_ref=%d (%.1fs)", len(ref.features), time.time() - t0
        )
        self.timed("FID reference statistics", t0)
        return ref
