"""The full variational bound of DDPM in bits/dim (paper Eq. 5, Table 1's NLL) and the data of the
rate–distortion curve (Fig. 5, Table 4), as one ``lax.scan`` over all T steps — the released
code's ``calc_bpd_loop``.

``denoise_fn(x_t [B, ...], t int32 [B]) -> [B, ..., C or 2C]`` as in `diffusion.sampling`;
``x0`` holds data in [−1, 1] (8-bit data for the discrete decoder term to be a code length).
Wrap in ``jax.jit`` (closing over ``denoise_fn`` and the keyword options).
"""
from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp

from diffusion import gaussian
from diffusion.losses import mean_flat, prior_bpd, vb_terms_bpd
from diffusion.schedules import Schedule

__all__ = ["bits_per_dim", "rate_distortion"]


def bits_per_dim(schedule: Schedule, denoise_fn: Callable, x0, key, *, mean_type: str,
                 var_type: str, clip_denoised: bool = False) -> Dict[str, jnp.ndarray]:
    """Every term of the variational bound (paper Eq. 5) for each example, in bits/dim.

    L = L_T + Σ_{t>0} L_{t−1} + L_0: for code index t = T−1 down to 0 (one ``lax.scan``, T network
    calls), x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with fresh ε from ``fold_in(key, t)`` (Eq. 4), then
    `losses.vb_terms_bpd`: KL(q(x_{t−1}|x_t,x_0) ‖ pθ(x_{t−1}|x_t)) for t > 0 and the discretized
    decoder NLL −log pθ(x_0|x_1) (Eq. 13) at t = 0; the prior term L_T = KL(q(x_T|x_0) ‖ N(0, I)).
    ``clip_denoised`` defaults to False (the bound of the unclipped model, as the ``kl`` training
    loss uses; the released ``calc_bpd_loop`` defaults to True).

    Args:
      schedule: `Schedule` with T steps.
      denoise_fn: ``(x_t [B, ...], t int32 [B]) -> [B, ..., C or 2C]``.
      x0: ``[B, ...]`` data in [−1, 1].
      key: PRNG key.
      mean_type, var_type: as in `gaussian.p_mean_variance`.

    Returns:
      dict with ``total_bpd`` ``[B]`` (= Σ_t terms + prior), ``terms_bpd`` ``[B, T]`` (column t is
      L_{t−1} in the paper's numbering; column 0 is the decoder NLL), ``prior_bpd`` ``[B]`` and
      ``mse`` ``[B, T]`` (mean over pixels of (x̂_0(x_t, t) − x_0)², the distortion at step t) and
      ``mse_clipped`` ``[B, T]`` (the same with x̂_0 clipped to [−1, 1], the receiver's image
      estimate of Fig. 5; unclipped x̂_0 from ε at t ≈ T is ε̂'s error amplified by 1/√ᾱ_t).
    """
    gaussian.check_types(mean_type, var_type)
    x0 = jnp.asarray(x0, jnp.float32)
    B, T = x0.shape[0], schedule.num_timesteps

    def body(carry, t):
        t_b = jnp.full((B,), t, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, dtype=jnp.float32)
        x_t = gaussian.q_sample(schedule, x0, t_b, noise)
        terms, pred_xstart = vb_terms_bpd(schedule, denoise_fn(x_t, t_b), x0, x_t, t_b,
                                          mean_type=mean_type, var_type=var_type,
                                          clip_denoised=clip_denoised)
        return carry, (terms, mean_flat(jnp.square(pred_xstart - x0)),
                       mean_flat(jnp.square(jnp.clip(pred_xstart, -1.0, 1.0) - x0)))

    _, (terms_tb, mse_tb, msec_tb) = jax.lax.scan(body, None,
                                                  jnp.arange(T - 1, -1, -1, dtype=jnp.int32))
    terms_bt = terms_tb[::-1].T     # scan ran t = T−1..0; column t is step t
    prior = prior_bpd(schedule, x0)
    return {"total_bpd": jnp.sum(terms_bt, axis=1) + prior, "terms_bpd": terms_bt,
            "prior_bpd": prior, "mse": mse_tb[::-1].T, "mse_clipped": msec_tb[::-1].T}


def rate_distortion(bpd: Dict[str, jnp.ndarray]) -> Dict[str, jnp.ndarray]:
    """Rate–distortion data from a `bits_per_dim` result (paper Sec. 4.3, Fig. 5, Table 4).

    Progressive coding (Algorithms 3–4) sends x_{T−1}, x_{T−2}, ... (code indices); the term in
    column s of ``terms_bpd`` is the cost of sending x_{s−1} given x_s, so once x_t has been
    received the rate is L_T + Σ_{s > t} terms[s] and the receiver's estimate x̂_0(x_t) has
    distortion RMSE = √mse_t · 127.5 on the [0, 255] scale. Table 4's split: ``rate`` =
    prior + Σ_{t>0} terms (= ``rate_bpd[:, 0]``), ``distortion`` = the decoder term terms[:, 0]
    (bits/dim); rate + distortion = total_bpd.

    Returns dict: ``rate_bpd`` ``[B, T]``, ``distortion_rmse`` ``[B, T]`` (0–255 scale),
    ``rate`` ``[B]``, ``distortion`` ``[B]``.
    """
    terms = bpd["terms_bpd"]
    prior = bpd["prior_bpd"]
    after = jnp.cumsum(terms[:, ::-1], axis=1)[:, ::-1] - terms   # Σ_{s > t}
    return {"rate_bpd": after + prior[:, None],
            "distortion_rmse": jnp.sqrt(bpd["mse"]) * 127.5,
            "rate": jnp.sum(terms[:, 1:], axis=1) + prior,
            "distortion": terms[:, 0]}
