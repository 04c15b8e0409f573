"""The real-data FID floor: FID/KID of real images scored exactly like the samples (same N,
resolution, feature network and reference), computed once per run settings and kept in
``<workdir>/eval/real_floor.json`` (`RealFloor`)."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

from diffusion import io
from diffusion.evaluation import settings as S
from diffusion.evaluation.references import compute_fid_kid, to_rgb, with_progress
from diffusion.evaluation.results import all_processes
from diffusion.metrics import fid as fid_lib

__all__ = ["RealFloor"]


class RealFloor:
    """The real-data FID floor of one run.

    Args:
      config: the run's config (``data``, ``eval.fid_split``, ``eval.num_samples``,
        ``eval.real_floor_split``).
      eval_dir: ``<workdir>/eval``; the floor is kept in ``real_floor.json`` there.
      reference: ``split -> (reference split, statistics)`` (`FidReferences.get`).
      feature_fn: ``() -> (uint8 [B, H, W, 3] -> features [B, d])``, called when first needed.
      network: the feature network's name (part of the stored settings).
      feature_batch_size: images per feature batch.
      main: whether this is the main process (the only one that writes the file).
      timed: ``(stage, t0) -> None`` records the wall time spent.
    """

    def __init__(
        self,
        config,
        eval_dir: str,
        *,
        reference: Callable[[str], Tuple[str, fid_lib.ReferenceStatistics]],
        feature_fn: Callable[[], Callable],
        network: str,
        feature_batch_size: int,
        main: bool,
        timed: Callable[[str, float], None],
    ):
        self.config, self.eval_dir, self.network = config, eval_dir, network
        self.reference, self.feature_fn = reference, feature_fn
        self.feature_batch_size, self.main, self.timed = feature_batch_size, main, timed
        self.path = io.join(eval_dir, "real_floor.json")

    def get(self) -> Optional[Dict[str, Any]]:
        """FID/KID of real images of `settings.real_floor_split` against the primary reference, at
        the same N as the samples (fewer if the split is smaller: then said), computed once and
        kept in ``eval/real_floor.json`` with its settings; None when disabled or unavailable.

        Returns ``{'fid', 'kid', 'kid_se', 'num', 'num_ref', 'settings'}``; a stored floor is
        reused when its ``settings`` (split, reference split, network, dataset, image size) equal
        the current ones on every process."""
        from diffusion.data import load_split

        c = self.config
        split = S.real_floor_split(c)
        if split is None:
            return None
        primary = S.split_list(c.eval.fid_split)[0]
        ref_split, ref = self.reference(primary)
        settings = {
            "split": split,
            "ref_split": ref_split,
            "network": self.network,
            "dataset": c.data.dataset,
            "image_size": c.data.image_size,
        }
        stored = io.read_json(self.path, default={})
        if all_processes(bool(stored) and stored.get("settings") == settings):
            return stored
        try:
            images = load_split(
                c.data.dataset, split, data_dir=c.data.data_dir, image_size=c.data.image_size
            )
        except (ValueError, KeyError) as e:
            logging.warning(
                "No real-data FID floor: split %r of %s is not available (%s); set "
                "config.eval.real_floor_split to another split or '' to skip.",
                split,
                c.data.dataset,
                e,
            )
            return None
        if len(images) < c.eval.num_samples:
            logging.warning(
                "Real-data floor: %s has %d images, fewer than the %d samples: the "
                "floor is at N=%d (biased upwards relative to the model's FID).",
                split,
                len(images),
                c.eval.num_samples,
                len(images),
            )
        t0 = time.time()
        fn = with_progress(self.feature_fn(), len(images), f"real-data floor {split}")
        feats = fid_lib.extract_features(to_rgb(images), fn, batch_size=self.feature_batch_size)
        res = compute_fid_kid(feats, ref)
        floor = {
            "fid": res["fid"],
            "kid": res["kid"],
            "kid_se": res["kid_se"],
            "num": res["num_gen"],
            "num_ref": res["num_ref"],
            "settings": settings,
        }
        logging.info(
            "Real-data floor: FID@%d = %.3f, KID = %.5f for real %s/%s images against "
            "the same reference (%.1fs)",
            floor["num"],
            floor["fid"],
            floor["kid"],
            c.data.dataset,
            split,
            time.time() - t0,
        )
        self.timed("real-data floor", t0)
        if self.main:
            io.write_json(self.path, floor, indent=1, sort_keys=True)
        return floor
