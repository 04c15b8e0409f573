"""Heun's second-order method on the Karras et al. (2022) σ grid (their Algorithm 1, S_churn = 0),
mapped to a trained model's discrete schedule.

In the variance-exploding view x̃ = x/√ᾱ = x_0 + σ ε the probability-flow ODE is
dx̃/dσ = (x̃ − D(x̃; σ))/σ (Karras Eq. 3 with s = 1), D the denoiser. The grid is `grids.karras`
(ρ = 7 by default) between σ_max = σ(T−1) and σ_min = σ(0), then σ = 0. Each step from σ_i to
σ_{i+1}: d_i = (x̃_i − D(x̃_i; σ_i))/σ_i, x̃' = x̃_i + (σ_{i+1} − σ_i) d_i (Euler), and when
σ_{i+1} > 0 the trapezoidal correction x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i)(d_i + d')/2 with
d' = (x̃' − D(x̃'; σ_{i+1}))/σ_{i+1}. The last step (to σ = 0) stays Euler (k-diffusion's
convention), so K grid points cost NFE = 2K − 1.

Fractional t: σ_i maps to the fractional code index t(σ_i) by interpolating log σ between trained
timesteps (`grids.t_at_sigma`, as k-diffusion's ``DiscreteEpsDDPMDenoiser``); the U-Net's
sinusoidal embedding accepts real t, so it is fed as is (``fractional_t=True``), or the grid is
snapped to the trained integers first (``fractional_t=False``).
"""

from __future__ import annotations

from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.samplers import denoiser, grids
from diffusion.samplers.base import Sampler, SampleResult, initial_noise, register

__all__ = ["solve", "Heun"]


def solve(x_T, denoise_fn, param, t_grid, *, log_sig, clip: bool):
    """Heun's method from the VP sample ``x_T`` ``[B, H, W, C]`` at ``t_grid[0]`` over the
    descending grid ``t_grid`` ``[K]`` (NumPy) and a final Euler step to σ = 0, as one
    ``lax.scan`` (carry x̃; the correction under ``lax.cond``). Returns x_0 ``[B, H, W, C]``."""
    t_grid = np.asarray(t_grid, np.float64)
    sig = grids.sigma_at(log_sig, t_grid)
    sig_next = np.append(sig[1:], 0.0)
    t_next = np.append(t_grid[1:], 0.0)
    integer = bool(np.all(t_grid == np.round(t_grid)))
    dt = x_T.dtype
    tdt = jnp.int32 if integer else jnp.float32
    xs = {
        "t": jnp.asarray(t_grid, tdt),
        "s": jnp.asarray(sig, dt),
        "t_n": jnp.asarray(t_next, tdt),
        "s_n": jnp.asarray(sig_next, dt),
    }

    def d_of(x_ve, t, s):
        ab = 1.0 / (1.0 + s * s)
        x0 = denoiser.x0_prediction(denoise_fn, param, x_ve * jnp.sqrt(ab), t, ab, clip=clip)
        return (x_ve - x0) / s

    def step(x, c):
        d = d_of(x, c["t"], c["s"])
        x_euler = x + (c["s_n"] - c["s"]) * d

        def heun(_):
            return x + (c["s_n"] - c["s"]) * 0.5 * (d + d_of(x_euler, c["t_n"], c["s_n"]))

        return jax.lax.cond(c["s_n"] > 0, heun, lambda _: x_euler, None), None

    x_ve = x_T * jnp.asarray(np.sqrt(1.0 + sig[0] ** 2), dt)
    x0, _ = jax.lax.scan(step, x_ve, xs)
    return x0


class Heun(Sampler):
    """Heun (Karras et al. 2022, Algorithm 1 deterministic). ``num_steps`` K is the number of σ
    grid points; NFE = 2K − 1. Options (``config.sample.heun``): ``rho`` (> 0, 7 by default),
    ``fractional_t``."""

    name = "heun"
    options = {"rho": 7.0, "fractional_t": True}

    def run(self, spec, schedule, denoise_fn, shape, key, param, *, progressive_every=None):
        """See `Sampler.run` (deterministic given x_T; no progressive x̂_0)."""
        if progressive_every:
            raise ValueError("sampler 'heun' does not record progressive x̂_0")
        log_sig = grids.log_sigmas(schedule)
        t = grids.karras(log_sig, self.steps(spec, schedule.num_timesteps), self.opt(spec, "rho"))
        if not self.opt(spec, "fractional_t"):
            t = grids.snap_to_integers(t)
        x_T, _ = initial_noise(key, shape)
        return SampleResult(
            solve(x_T, denoise_fn, param, t, log_sig=log_sig, clip=spec.clip_denoised)
        )

    def nfe(self, spec, num_timesteps):
        return 2 * self.steps(spec, num_timesteps) - 1

    def steps_for_nfe(self, nfe, num_timesteps):
        return max(1, (int(nfe) + 1) // 2)

    def tag(self, spec, num_timesteps):
        rnd = "" if self.opt(spec, "fractional_t") else "_int"
        return f"heun{self.steps(spec, num_timesteps)}_rho{self.opt(spec, 'rho'):g}{rnd}"

    def describe(self, spec, num_timesteps):
        k = self.steps(spec, num_timesteps)
        t = "fractional t" if self.opt(spec, "fractional_t") else "integer t"
        return (
            f"Heun K={k}-point Karras grid (rho={self.opt(spec, 'rho'):g}), {t} "
            f"(NFE {self.nfe(spec, num_timesteps)})"
        )

    def problems(self, spec, config, where) -> List[str]:
        p = denoiser.mean_type_problems(self.name, config.diffusion.mean_type)
        rho = self.opt(spec, "rho")
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho <= 0:
            p.append(f"config.sample.heun.rho={rho!r} is out of range; allowed: a number > 0 (7)")
        if not isinstance(self.opt(spec, "fractional_t"), bool):
            p.append(
                f"config.sample.heun.fractional_t={self.opt(spec, 'fractional_t')!r} must be True "
                "or False"
            )
        return p


register(Heun())
