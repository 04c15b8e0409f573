"""Training losses and variational-bound terms of DDPM (Ho et al. 2020, Sec. 3.4 and Eq. 5).

* ``mse``   — L_simple (Eq. 14): mean over pixels of (target − output)², target ∈ {ε, x_0, μ̃, v}.
* ``kl``    — the true bound L: one random term L_{t−1} per example (KL for t>0, decoder NLL at
  t=0), in bits/dim, as the released code's ``loss_type='kl'``.
* ``hybrid``— Improved DDPM's L_simple + λ·T·L_t with a stop-gradient on the mean in the vb term so
  that only the variance learns from it (λ = 0.001 by default; with T = 1000 this is their
  ``mse + vb``).

Everything is per example (``[B]``); the caller averages.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import gaussian
from diffusion.schedules import Schedule

LOSS_TYPES = ("mse", "kl", "hybrid")
LEARNED_VARS = ("learned", "learned_range")

__all__ = [
    "LOSS_TYPES",
    "mean_flat",
    "vb_terms_bpd",
    "prior_bpd",
    "check_loss_config",
    "loss_from_output",
    "training_losses",
]


def mean_flat(x):
    """Mean over all axes but the batch axis: ``[B, ...] -> [B]``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def check_loss_config(mean_type: str, var_type: str, loss_type: str) -> None:
    """Raises ValueError for unknown names and for combinations that cannot train, saying why."""
    gaussian.check_types(mean_type, var_type)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; valid: {list(LOSS_TYPES)}")
    if loss_type == "mse" and var_type in LEARNED_VARS:
        raise ValueError(
            f"loss_type='mse' with var_type={var_type!r}: the mse loss gives the variance output no "
            "gradient, so it would never learn. Use loss_type='hybrid' (Improved DDPM) or 'kl', or a "
            "fixed variance ('fixedlarge' / 'fixedsmall')."
        )
    if loss_type == "hybrid" and var_type not in LEARNED_VARS:
        raise ValueError(
            f"loss_type='hybrid' with var_type={var_type!r}: the vb term only trains a learned "
            "variance (the mean is stop-gradient'ed), so with a fixed variance this is just 'mse'. "
            "Use var_type='learned_range' (or 'learned'), or loss_type='mse'."
        )


def vb_terms_bpd(
    schedule: Schedule,
    model_output,
    x0,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
):
    """One term of the variational bound (paper Eq. 5) per example, in bits/dim.

    L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ pθ(x_{t−1}|x_t)) for t > 0 and the decoder's
    −log pθ(x_0|x_1) (Eq. 13) for t = 0. ``x0``, ``x_t``: ``[B, H, W, C]``; ``model_output``:
    ``[B, H, W, C or 2C]``; ``t``: int ``[B]``. Returns (terms ``[B]``, pred_xstart ``[B, ...]``).
    """
    true_mean, _, true_log_var = gaussian.q_posterior_mean_variance(schedule, x0, x_t, t)
    p = gaussian.p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    kl = mean_flat(gaussian.normal_kl(true_mean, true_log_var, p.mean, p.log_variance)) / np.log(
        2.0
    )
    nll = -gaussian.discretized_gaussian_log_likelihood(
        x0, means=p.mean, log_scales=0.5 * p.log_variance
    )
    nll = mean_flat(nll) / np.log(2.0)
    return jnp.where(t == 0, nll, kl), p.pred_xstart


def prior_bpd(schedule: Schedule, x0):
    """KL(q(x_T | x_0) ‖ N(0, I)) per example in bits/dim, ``[B, ...] -> [B]``; it has no
    parameters (≈1e-5 bits/dim for the linear schedule on data in [−1, 1])."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=jnp.int32)
    mean, _, log_var = gaussian.q_mean_variance(schedule, x0, t)
    return mean_flat(gaussian.normal_kl(mean, log_var, 0.0, 0.0)) / np.log(2.0)


def _mse_target(schedule, mean_type, x0, x_t, t, noise):
    if mean_type == "eps":
        return noise
    if mean_type == "xstart":
        return x0
    if mean_type == "xprev":
        return gaussian.q_posterior_mean_variance(schedule, x0, x_t, t)[0]
    return gaussian.predict_v(schedule, x0, t, noise)


def loss_from_output(
    schedule: Schedule,
    model_output,
    x0,
    x_t,
    t,
    noise,
    *,
    mean_type: str,
    var_type: str,
    loss_type: str,
    hybrid_lambda: float = 0.001,
):
    """Per-example loss ``[B]`` from a network output at (x_t, t), where x_t = q_sample(x0, t, noise).

    ``model_output`` ``[B, H, W, C]`` (fixed Σ) or ``[B, H, W, 2C]`` (learned Σ). See the module
    docstring for the three losses. Returns ``(loss [B], aux)`` with aux holding the mse and vb parts.
    """
    check_loss_config(mean_type, var_type, loss_type)
    aux = {}
    if loss_type == "kl":
        loss, _ = vb_terms_bpd(
            schedule,
            model_output,
            x0,
            x_t,
            t,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=False,
        )
        aux["vb"] = loss
        return loss, aux
    learned = var_type in LEARNED_VARS
    mean_out = jnp.split(model_output, 2, axis=-1)[0] if learned else model_output
    target = _mse_target(schedule, mean_type, x0, x_t, t, noise)
    if mean_out.shape != target.shape:
        raise ValueError(
            f"model output mean part has shape {mean_out.shape}, expected {target.shape}"
        )
    mse = mean_flat(jnp.square(target - mean_out))
    aux["mse"] = mse
    if loss_type == "mse":
        return mse, aux
    # hybrid: the vb term sees a frozen mean, so it trains the variance only.
    var_out = jnp.split(model_output, 2, axis=-1)[1]
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_out), var_out], axis=-1)
    vb, _ = vb_terms_bpd(
        schedule, frozen, x0, x_t, t, mean_type=mean_type, var_type=var_type, clip_denoised=False
    )
    aux["vb"] = vb
    return mse + hybrid_lambda * schedule.num_timesteps * vb, aux


def training_losses(
    schedule: Schedule,
    denoise_fn: Callable,
    x0,
    t,
    noise,
    *,
    mean_type: str,
    var_type: str,
    loss_type: str,
    hybrid_lambda: float = 0.001,
):
    """Algorithm 1's loss for one batch: x_t = q_sample(x0, t, noise), out = denoise_fn(x_t, t),
    then `loss_from_output`. ``x0``, ``noise`` ``[B, H, W, C]``; ``t`` int ``[B]``; returns
    ``(loss [B], aux)``."""
    x_t = gaussian.q_sample(schedule, x0, t, noise)
    out = denoise_fn(x_t, t)
    return loss_from_output(
        schedule,
        out,
        x0,
        x_t,
        t,
        noise,
        mean_type=mean_type,
        var_type=var_type,
        loss_type=loss_type,
        hybrid_lambda=hybrid_lambda,
    )
