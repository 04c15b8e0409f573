"""The data of the step being evaluated: its samples, drawn once (or reused from the step's NPZ),
and their Inception features, extracted once (or reused from the step's features NPZ), shared by
every FID evaluator of the step (`StepSamples`)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np

from diffusion import io, samplers
from diffusion.evaluation import generator
from diffusion.evaluation import settings as S
from diffusion.evaluation.references import to_rgb, with_progress
from diffusion.evaluation.results import (
    ResultsStore,
    all_processes,
    gather,
    load_features,
    load_npz,
)
from diffusion.metrics import fid as fid_lib

__all__ = ["StepSamples"]


class StepSamples:
    """The samples and sample features of one step at a time, for one run.

    Call `new_step` before each step; `samples` and `features` then draw / extract at most once
    for that step (and reuse complete files under ``eval_dir`` from an earlier run).

    Args:
      config: the run's config (``eval.num_samples``, ``eval.batch_size``,
        ``eval.inception_weights``, ``data``, ``seed``).
      mesh: the device mesh the samples are drawn on.
      model: the network (`factories.create_model`).
      spec: the sampler (`samplers.spec_from_config`); ``chain``: its tag (`samplers.tag`).
      eval_dir: ``<workdir>/eval``, where the per-step NPZ / PNG files go.
      network: the feature network's name (a cache key of the features NPZ).
      feature_batch_size: images per feature batch.
      feature_fn: ``() -> (uint8 [B, H, W, 3] -> pool3 [B, d])``, called when first needed.
      feature_logits_fn: ``() -> (uint8 [B, H, W, 3] -> (pool3 [B, d], logits [B, 1008]))``,
        used instead when ``eval.inception_weights`` is set.
      store: the run's results store (saved once the step's sample settings are recorded).
      main: whether this is the main process (the only one that writes the grid and images).
      write_images: ``(step, {name: uint8 [n, H, W, C]}) -> None``, the writer's image output.
      timed: ``(stage, t0) -> None`` records the wall time spent.
    """

    def __init__(
        self,
        config,
        mesh,
        model,
        spec,
        chain: str,
        eval_dir: str,
        *,
        network: str,
        feature_batch_size: int,
        feature_fn: Callable[[], Callable],
        feature_logits_fn: Callable[[], Callable],
        store: ResultsStore,
        main: bool,
        write_images: Callable[[int, Dict[str, np.ndarray]], None],
        timed: Callable[[str, float], None],
    ):
        self.config, self.mesh, self.model, self.spec, self.chain = config, mesh, model, spec, chain
        self.eval_dir, self.network, self.feature_batch_size = eval_dir, network, feature_batch_size
        self.feature_fn, self.feature_logits_fn = feature_fn, feature_logits_fn
        self.store, self.main, self.write_images, self.timed = store, main, write_images, timed
        self._features: Optional[Tuple[np.ndarray, Optional[np.ndarray]]] = None

    def new_step(self) -> None:
        """Forgets the previous step's features (the next `features` call works on a new step)."""
        self._features = None

    def file(self, kind: str, step: int, ext: str, per_process: bool = False) -> str:
        """``<eval_dir>/<kind>_step_<step>_n<num_samples>_<chain>[_noclip][_p<process>]<ext>``:
        the step's ``kind`` file (``'samples'``, ``'features'``); ``per_process`` adds the process
        index in multi-process runs."""
        c = self.config
        name = f"{kind}_step_{step:08d}_n{c.eval.num_samples}_{self.chain}"
        if not self.spec.clip_denoised:
            name += "_noclip"
        if per_process and jax.process_count() > 1:
            name += f"_p{jax.process_index()}"
        return io.join(self.eval_dir, name + ext)

    def samples(self, step: int, params) -> np.ndarray:
        """This process's ``eval.num_samples`` uint8 samples ``[N / processes, H, W, C]`` of
        ``step`` (drawn, or reused from the step's NPZ when complete), with the grid PNG."""
        c = self.config
        n = c.eval.num_samples
        n_local = n // jax.process_count()
        s, ch = c.data.image_size, c.data.channels
        path = self.file("samples", step, ".npz", per_process=True)
        images = load_npz(path, "images", (n_local, s, s, ch), np.uint8)
        if all_processes(images is not None):
            logging.info("Step %d: reusing %d samples from %s", step, n, path)
            return images
        logging.info(
            "Step %d: drawing N=%d samples with the %s chain (global batch %d)",
            step,
            n,
            samplers.describe(self.spec, c.diffusion.num_timesteps),
            generator.batch_for(n, c.eval.batch_size, int(self.mesh.devices.size)),
        )
        t0 = time.time()
        images = generator.generate_samples(
            c, self.model, params, n, mesh=self.mesh, spec=self.spec
        )
        logging.info("Step %d: %d samples in %.1fs", step, n, time.time() - t0)
        self.timed("sampling", t0)
        io.write_npz(
            path,
            images=images,
            step=np.asarray(step),
            seed=np.asarray(c.seed),
            chain=np.asarray(self.chain),
        )
        if self.main:
            io.save_sample_grid(images[: S.GRID_SIZE], self.file("samples", step, ".png"))
            self.write_images(step, {f"eval_samples_{self.chain}": images[:16]})
        return images

    def features(self, step: int, params, entry: dict) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``(features [N, 2048], logits [N, 1008] or None)`` of the step's samples, all
        processes' rows gathered; computed once per step and cached in the step's features NPZ
        (logits when ``eval.inception_weights`` is set: pool3 and logits in one pass). When the
        samples are used, ``entry['samples']`` records how they were drawn."""
        if self._features is not None:
            return self._features
        c = self.config
        n = c.eval.num_samples
        feat_path = self.file("features", step, ".npz", per_process=True)
        want_is = bool(c.eval.get("inception_weights"))
        cached = load_features(
            feat_path, self.network, n // jax.process_count(), c.seed, need_logits=want_is
        )
        feats, logits = cached if cached is not None else (None, None)
        if not all_processes(feats is not None):
            images = self.samples(step, params)
            entry["samples"] = self._sample_settings(step)
            self.store.save()
            t0 = time.time()
            extra: Dict[str, Any] = {}
            if want_is:
                fn = with_progress(self.feature_logits_fn(), len(images), f"step {step} samples")
                feats, logits = fid_lib.extract_features_and_logits(
                    to_rgb(images), fn, batch_size=self.feature_batch_size
                )
                extra["logits"] = logits
            else:
                fn = with_progress(self.feature_fn(), len(images), f"step {step} samples")
                feats = fid_lib.extract_features(
                    to_rgb(images), fn, batch_size=self.feature_batch_size
                )
            logging.info(
                "Step %d: Inception features of %d samples in %.1fs",
                step,
                len(feats),
                time.time() - t0,
            )
            self.timed("Inception features of the samples", t0)
            io.write_npz(
                feat_path,
                features=feats,
                network=np.asarray(self.network),
                seed=np.asarray(c.seed),
                **extra,
            )
        feats = gather(feats)
        if want_is:
            logits = gather(logits)
        self._features = (feats, logits if want_is else None)
        return self._features

    def _sample_settings(self, step: int) -> Dict[str, Any]:
        """The results entry's ``samples``: how the step's samples were drawn and their file."""
        c = self.config
        out = {
            "num_samples": c.eval.num_samples,
            "chain": self.chain,
            "num_steps": self.spec.num_steps,
            "nfe": samplers.nfe(self.spec, c.diffusion.num_timesteps),
            "method": self.spec.method,
            "clip_denoised": self.spec.clip_denoised,
            "file": os.path.basename(self.file("samples", step, ".npz", per_process=True)),
        }
        if samplers.get(self.spec.method).uses_eta:
            out["eta"] = self.spec.eta
        if self.spec.options:
            out["options"] = dict(self.spec.options)
        return out
