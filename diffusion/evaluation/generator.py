"""Samples from a checkpoint's EMA parameters with the configured sampler, in global batches
sharded over the mesh (`sampling.sample_in_batches`). The noise is the `rng.EVAL_SAMPLES` stream,
the same for every checkpoint, so grids and metrics of different steps are comparable."""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import numpy as np

from diffusion import factories, rng, samplers, sampling

__all__ = ["make_sample_fn", "batch_for", "generate_samples"]


def make_sample_fn(config, model, params, spec: Optional[samplers.SamplerSpec] = None) -> Callable:
    """``sample_fn(key, n) -> [n, H, W, C]`` float32 in [−1, 1] from ``params`` with ``spec``
    (default `samplers.spec_from_config`: ``config.sample``)."""
    spec = spec or samplers.spec_from_config(config)
    param = factories.parameterization(config)
    schedule = factories.schedule_from_config(config)
    s, c = config.data.image_size, config.data.channels
    denoise_fn = factories.make_denoise_fn(model, params)

    def sample_fn(key, n):
        return samplers.draw(spec, schedule, denoise_fn, (n, s, s, c), key, param).x

    return sample_fn


def batch_for(n_global: int, batch_size: int, num_devices: int) -> int:
    """The global batch: ``batch_size``, or less when n is smaller (a multiple of the devices)."""
    return min(batch_size, max(1, math.ceil(n_global / num_devices)) * num_devices)


def generate_samples(
    config, model, params, num_samples: int, *, mesh, spec: Optional[samplers.SamplerSpec] = None
) -> np.ndarray:
    """This process's share of ``num_samples`` uint8 samples ``[N_local, H, W, C]`` drawn with
    ``spec`` (default: ``config.sample``) in global batches of ``config.eval.batch_size`` on
    ``mesh``."""
    key = rng.stream(config.seed, rng.EVAL_SAMPLES)
    batch = batch_for(num_samples, config.eval.batch_size, int(mesh.devices.size))
    return sampling.sample_in_batches(
        make_sample_fn(config, model, params, spec),
        num_samples,
        batch // jax.process_count(),
        key,
        mesh=mesh,
        as_uint8=True,
    )
