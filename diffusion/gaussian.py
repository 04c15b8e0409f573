"""The Gaussian forward process q, its posterior, the reverse-process parameterisations pθ, and the
Gaussian helpers (KL, discretized decoder likelihood) of DDPM (Ho et al. 2020).

All functions are pure, jit- and vmap-friendly; ``x`` is ``[B, ...]`` (usually ``[B, H, W, C]``)
float32 and ``t`` is an int array ``[B]`` of code indices 0..T-1 (paper time t+1).
Derivations: docs/math.md.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from diffusion.schedules import Schedule

MEAN_TYPES = ("eps", "xstart", "xprev", "v")
VAR_TYPES = ("fixedsmall", "fixedlarge", "learned", "learned_range")

__all__ = [
    "MEAN_TYPES",
    "VAR_TYPES",
    "extract",
    "q_mean_variance",
    "q_sample",
    "q_posterior_mean_variance",
    "predict_xstart_from_eps",
    "predict_eps_from_xstart",
    "predict_xstart_from_xprev",
    "predict_xstart_from_v",
    "predict_v",
    "PMeanVariance",
    "p_mean_variance",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "check_types",
    "model_output_channels",
]


def check_types(mean_type: str, var_type: str) -> None:
    """Raises ValueError naming the valid values if ``mean_type`` or ``var_type`` is unknown."""
    if mean_type not in MEAN_TYPES:
        raise ValueError(f"Unknown mean_type {mean_type!r}; valid: {list(MEAN_TYPES)}")
    if var_type not in VAR_TYPES:
        raise ValueError(f"Unknown var_type {var_type!r}; valid: {list(VAR_TYPES)}")


def model_output_channels(var_type: str, image_channels: int) -> int:
    """Channels the network must output: 2C for learned variances (mean ‖ variance), else C."""
    check_types("eps", var_type)
    return 2 * image_channels if var_type in ("learned", "learned_range") else image_channels


def extract(a: jnp.ndarray, t: jnp.ndarray, x_shape) -> jnp.ndarray:
    """Gathers ``a[t]`` (``a`` ``[T]``, ``t`` int ``[B]``) and reshapes to ``[B, 1, ..., 1]`` so it
    broadcasts against an ``x`` of shape ``x_shape`` = ``[B, ...]``."""
    t = jnp.asarray(t)
    if t.ndim != 1 or t.shape[0] != x_shape[0]:
        raise ValueError(
            f"t must be an int array [B] with B = x.shape[0] = {x_shape[0]}, "
            f"got t of shape {t.shape}"
        )
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"t must be an integer array (code index 0..T-1), got dtype {t.dtype}")
    out = jnp.take(a, t, axis=0)
    return out.reshape((x_shape[0],) + (1,) * (len(x_shape) - 1))


def q_mean_variance(schedule: Schedule, x0, t):
    """q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I) (paper Eq. 4). Returns (mean [B,...], variance
    [B,1,..], log_variance [B,1,..])."""
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
    variance = extract(1.0 - schedule.alphas_cumprod, t, x0.shape)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t, x0.shape)
    return mean, variance, log_variance


def q_sample(schedule: Schedule, x0, t, noise):
    """Draws x_t ~ q(x_t | x_0) by reparameterisation: √ᾱ_t x_0 + √(1−ᾱ_t) ε (paper Eq. 4).
    ``x0``, ``noise``: ``[B, ...]``; returns ``[B, ...]``."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} must equal x0 shape {x0.shape}")
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise
    )


def q_posterior_mean_variance(schedule: Schedule, x0, x_t, t):
    """q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I) (paper Eqs. 6–7):
    μ̃_t = β_t√ᾱ_{t−1}/(1−ᾱ_t) x_0 + (1−ᾱ_{t−1})√α_t/(1−ᾱ_t) x_t.
    Returns (mean [B,...], variance [B,1,..], log_variance [B,1,..] clipped at t=0)."""
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 shape {x0.shape} must equal x_t shape {x_t.shape}")
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.shape) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    )
    variance = extract(schedule.posterior_variance, t, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
    return mean, variance, log_variance


def predict_xstart_from_eps(schedule: Schedule, x_t, t, eps):
    """x̂_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε (inverting Eq. 4). ``[B, ...]``."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
    )


def predict_eps_from_xstart(schedule: Schedule, x_t, t, x0):
    """ε = (√(1/ᾱ_t) x_t − x_0) / √(1/ᾱ_t − 1), the inverse of `predict_xstart_from_eps`."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0) / extract(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape
    )


def predict_xstart_from_xprev(schedule: Schedule, x_t, t, xprev):
    """x̂_0 from the posterior mean: x̂_0 = μ/coef1 − (coef2/coef1) x_t (Eq. 7 solved for x_0)."""
    coef1 = extract(schedule.posterior_mean_coef1, t, x_t.shape)
    coef2 = extract(schedule.posterior_mean_coef2, t, x_t.shape)
    return xprev / coef1 - (coef2 / coef1) * x_t


def predict_v(schedule: Schedule, x0, t, eps):
    """The velocity target v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022). ``[B, ...]``."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.shape) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0
    )


def predict_xstart_from_v(schedule: Schedule, x_t, t, v):
    """x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v (exact because ᾱ + (1−ᾱ) = 1)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.shape) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v
    )


class PMeanVariance(NamedTuple):
    """pθ(x_{t−1} | x_t) = N(mean, variance) and the implied x̂_0; all broadcast to ``[B, ...]``."""

    mean: jnp.ndarray
    variance: jnp.ndarray
    log_variance: jnp.ndarray
    pred_xstart: jnp.ndarray


def p_mean_variance(
    schedule: Schedule,
    model_output,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
) -> PMeanVariance:
    """Turns a network output into pθ(x_{t−1} | x_t) (paper Sec. 3.2).

    ``model_output`` is ``[B, ..., C]`` for fixed variances and ``[B, ..., 2C]`` (mean part first,
    then the variance part) for ``learned`` (log σ², unconstrained, as in the paper's ablation) and
    ``learned_range`` (Improved DDPM: v ∈ [−1, 1] interpolates log β_t and log β̃_t).
    Fixed variances: ``fixedlarge`` σ² = β_t (log at t=0 is log β̃_1), ``fixedsmall`` σ² = β̃_t.
    Means: ``eps`` (x̂_0 from ε, then μ̃ — equal to Eq. 11), ``xstart``, ``xprev`` (output is μ),
    ``v``. With ``clip_denoised`` x̂_0 is clipped to [−1, 1] before μ̃ (released code).
    """
    check_types(mean_type, var_type)
    C = x_t.shape[-1]
    if var_type in ("learned", "learned_range"):
        if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * C:
            raise ValueError(
                f"var_type={var_type!r} needs a model output of shape "
                f"{x_t.shape[:-1] + (2 * C,)} (mean ‖ variance), got {model_output.shape}"
            )
        model_output, var_output = jnp.split(model_output, 2, axis=-1)
        if var_type == "learned":
            log_variance = var_output
        else:
            min_log = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
            max_log = extract(schedule.log_betas, t, x_t.shape)
            frac = (var_output + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        variance = jnp.exp(log_variance)
    else:
        if model_output.shape != x_t.shape:
            raise ValueError(
                f"var_type={var_type!r} needs a model output of shape {x_t.shape}, "
                f"got {model_output.shape}"
            )
        if var_type == "fixedlarge":
            # σ² = β_t, except at t = 0 where β̃_1 is used for a better decoder likelihood (released
            # code; it only uses the log-variance, we keep variance = exp(log_variance) consistent).
            log_variance = extract(schedule.fixedlarge_log_variance, t, x_t.shape)
            variance = jnp.exp(log_variance)
        else:
            variance = extract(schedule.posterior_variance, t, x_t.shape)
            log_variance = extract(schedule.posterior_log_variance_clipped, t, x_t.shape)
        variance = jnp.broadcast_to(variance, x_t.shape)
        log_variance = jnp.broadcast_to(log_variance, x_t.shape)

    def process(x0):
        return jnp.clip(x0, -1.0, 1.0) if clip_denoised else x0

    if mean_type == "xprev":
        pred_xstart = process(predict_xstart_from_xprev(schedule, x_t, t, model_output))
        mean = model_output
    else:
        if mean_type == "eps":
            pred_xstart = predict_xstart_from_eps(schedule, x_t, t, model_output)
        elif mean_type == "xstart":
            pred_xstart = model_output
        else:  # v
            pred_xstart = predict_xstart_from_v(schedule, x_t, t, model_output)
        pred_xstart = process(pred_xstart)
        mean, _, _ = q_posterior_mean_variance(schedule, pred_xstart, x_t, t)
    return PMeanVariance(
        mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart
    )


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (broadcasting):
    0.5(−1 + lv2 − lv1 + e^{lv1−lv2} + (m1−m2)² e^{−lv2})."""
    # −1 + e^d written as expm1(d): exactly 0 for equal variances (float32 would leave ~1e-7).
    return 0.5 * (
        (logvar2 - logvar1)
        + jnp.expm1(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Φ(x) ≈ 0.5(1 + tanh(√(2/π)(x + 0.044715 x³))), the approximation the released code uses."""
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log pθ(x_0 | x_1) of the paper's decoder (Eq. 13), elementwise ``[B, ...]`` in nats.

    ``x`` holds 8-bit data rescaled to [−1, 1] (bins of width 2/255); ``means``, ``log_scales``
    (log σ) broadcast to it. The edge bins extend to ±∞; each probability is floored at 1e-12.
    """
    if x.shape != jnp.broadcast_shapes(x.shape, jnp.shape(means), jnp.shape(log_scales)):
        raise ValueError(
            f"means {jnp.shape(means)} / log_scales {jnp.shape(log_scales)} must "
            f"broadcast to x {x.shape}"
        )
    centered_x = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )
