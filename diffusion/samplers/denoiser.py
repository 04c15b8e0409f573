"""The network as a denoiser D(x_t, t) = x̂_0 for the ODE/SDE solvers, at any (fractional) t.

The network's time input is the code index t of the trained schedule. The DDPM U-Net's sinusoidal
embedding (`diffusion.models.layers.get_timestep_embedding`) casts t to float32 and is defined
for any real t, so the solvers feed fractional t directly (``fractional_t=True``, k-diffusion's
``DiscreteEpsDDPMDenoiser`` without ``quantize``); ``fractional_t=False`` rounds the grid to the
trained integers first (`grids.snap_to_integers`), for models whose time input must be an integer.
ᾱ at a grid point is always the one of its σ (`grids.sigma_at`): ᾱ = 1/(1 + σ²).
"""

from __future__ import annotations

from typing import List

import jax.numpy as jnp

from diffusion.parameterization import MeanType

__all__ = ["x0_prediction", "SUPPORTED_MEAN_TYPES", "mean_type_problems"]

SUPPORTED_MEAN_TYPES = (MeanType.EPS, MeanType.XSTART, MeanType.V)


def x0_prediction(denoise_fn, param, x, t, alpha_bar, *, clip: bool):
    """x̂_0 ``[B, H, W, C]`` from the network output at ``x`` ``[B, H, W, C]`` (the VP sample,
    x_t = √ᾱ x_0 + √(1−ᾱ) ε), time input ``t`` (scalar float32, or int32 on an integer grid;
    broadcast to ``[B]``) and ``alpha_bar``
    (scalar ᾱ at that t). The conversions of `diffusion.gaussian` written for a scalar ᾱ:
    ε-prediction x̂_0 = (x_t − √(1−ᾱ) ε̂)/√ᾱ (paper Eq. 15 rearranged), x_0-prediction as is,
    v-prediction x̂_0 = √ᾱ x_t − √(1−ᾱ) v̂ (Salimans & Ho 2022, Sec. 4). The variance half of a
    learned-variance output is ignored; ``clip`` clips x̂_0 to [−1, 1]."""
    t = jnp.asarray(t)
    t_b = jnp.broadcast_to(t, (x.shape[0],))
    out = denoise_fn(x.astype(jnp.float32), t_b).astype(x.dtype)
    if param.var.is_learned:
        out = jnp.split(out, 2, axis=-1)[0]
    a = jnp.sqrt(alpha_bar).astype(x.dtype)
    b = jnp.sqrt(1.0 - alpha_bar).astype(x.dtype)
    if param.mean == MeanType.EPS:
        x0 = (x - b * out) / a
    elif param.mean == MeanType.XSTART:
        x0 = out
    elif param.mean == MeanType.V:
        x0 = a * x - b * out
    else:
        raise ValueError(f"mean_type {param.mean!r} is not supported by the solvers")
    return jnp.clip(x0, -1.0, 1.0) if clip else x0


def mean_type_problems(method: str, mean_type: str) -> List[str]:
    """A one-line problem when the network's ``mean_type`` cannot drive ``method``."""
    if mean_type in [m.value for m in SUPPORTED_MEAN_TYPES]:
        return []
    return [
        f"config.sample.method={method!r} needs a network predicting eps, xstart or v, but "
        f"config.diffusion.mean_type={mean_type!r} (the one-step posterior mean, defined at "
        "integer t only); use --config.sample.method=ddim or ancestral"
    ]
