"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2: multistep, second order, data
prediction) and its stochastic variant DPM-Solver++(2M) SDE (the "midpoint" form of k-diffusion's
``sample_dpmpp_2m_sde`` / diffusers' ``sde-dpmsolver++``), on the discrete DDPM schedule.

With α_i = √ᾱ_i, σ_i = √(1−ᾱ_i), λ_i = log(α_i/σ_i), h_i = λ_{i+1} − λ_i, r_i = h_{i−1}/h_i and
D_i = x̂_0(x_i, t_i), one step from grid point i to i+1 is

    x_{i+1} = A_i x_i + B_i D_i + C_i (D_i − D_{i−1}) + N_i z_i,
    A_i = (σ_{i+1}/σ_i) e^{−ηh_i},  B_i = α_{i+1} (1 − e^{−(1+η)h_i}),  C_i = B_i/(2 r_i),
    N_i = σ_{i+1} √(1 − e^{−2ηh_i}),

η = 0 being the ODE solver (DPM-Solver++ Eq. 9 with the 2M correction D_i + (D_i − D_{i−1})/(2r_i))
and η = 1 the SDE solver (its exact linear part and noise; the same data-prediction correction).
The first step has no history (C_0 = 0: first order), and the final step, to σ = 0 (λ = ∞), is
first order: x_0 = D_{K−1} (A = C = N = 0, B = 1) — the "lower-order final step", which is also
what makes a few-step solve stable. One network call per step: NFE = K.
"""

from __future__ import annotations

from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from diffusion.samplers import denoiser, grids
from diffusion.samplers.base import Sampler, SampleResult, initial_noise, register

__all__ = ["multistep_coefficients", "solve", "DPMSolverPP2M", "DPMSolverPP2MSDE"]


def multistep_coefficients(alpha_bar: np.ndarray, eta: float) -> dict:
    """The float64 step coefficients ``A, B, C, N`` ``[K]`` of the module docstring for grid
    points with ``alpha_bar`` ``[K]`` (decreasing noise) followed by σ = 0."""
    ab = np.asarray(alpha_bar, np.float64)
    k = len(ab)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha) - np.log(sigma)
    A, B, C, N = (np.zeros(k) for _ in range(4))
    h = np.diff(lam)  # [K−1]
    for i in range(k - 1):
        A[i] = sigma[i + 1] / sigma[i] * np.exp(-eta * h[i])
        B[i] = -alpha[i + 1] * np.expm1(-(1.0 + eta) * h[i])
        N[i] = sigma[i + 1] * np.sqrt(-np.expm1(-2.0 * eta * h[i]))
        if i > 0:
            C[i] = B[i] * h[i] / (2.0 * h[i - 1])  # B/(2r), r = h_{i−1}/h_i
    B[k - 1] = 1.0  # the final step to σ = 0: x_0 = D_{K−1}
    return {"A": A, "B": B, "C": C, "N": N}


def solve(x_T, denoise_fn, param, t_grid, *, log_sig, eta: float, key, clip: bool):
    """Runs the multistep solver from ``x_T`` ``[B, H, W, C]`` (the VP sample at t_grid[0]) over
    the descending grid ``t_grid`` ``[K]`` (NumPy; fractional t is fed to the network as float32,
    an all-integer grid as int32) and a final step to σ = 0, as one ``lax.scan`` whose carry is
    ``(x_i, D_{i−1})``. ``log_sig``: `grids.log_sigmas` of the schedule; ``eta``: 0 (ODE) or > 0
    (SDE, noise z_i = normal(fold_in(key, i))). Returns x_0 ``[B, H, W, C]`` in x_T's dtype."""
    t_grid = np.asarray(t_grid, np.float64)
    alpha_bar = 1.0 / (1.0 + grids.sigma_at(log_sig, t_grid) ** 2)
    co = multistep_coefficients(alpha_bar, eta)
    integer = bool(np.all(t_grid == np.round(t_grid)))
    dt = x_T.dtype
    xs = {
        "i": jnp.arange(len(t_grid), dtype=jnp.int32),
        "t": jnp.asarray(t_grid, jnp.int32 if integer else jnp.float32),
        "ab": jnp.asarray(alpha_bar, dt),
        **{name: jnp.asarray(v, dt) for name, v in co.items()},
    }

    def step(carry, s):
        x, d_prev = carry
        d = denoiser.x0_prediction(denoise_fn, param, x, s["t"], s["ab"], clip=clip)
        x_next = s["A"] * x + s["B"] * d + s["C"] * (d - d_prev)
        if eta > 0:
            z = jax.random.normal(jax.random.fold_in(key, s["i"]), x.shape, dtype=dt)
            x_next = x_next + s["N"] * z
        return (x_next, d), None

    (x0, _), _ = jax.lax.scan(step, (x_T, jnp.zeros_like(x_T)), xs)
    return x0


class _DPMSolverPP(Sampler):
    options = {"grid": "logsnr", "fractional_t": True}
    eta = 0.0
    label = ""

    def grid(self, spec, schedule):
        log_sig = grids.log_sigmas(schedule)
        t = grids.GRIDS[self.opt(spec, "grid")](log_sig, self.steps(spec, schedule.num_timesteps))
        return log_sig, (t if self.opt(spec, "fractional_t") else grids.snap_to_integers(t))

    def run(self, spec, schedule, denoise_fn, shape, key, param, *, progressive_every=None):
        """See `Sampler.run` (no progressive x̂_0: ValueError when asked)."""
        if progressive_every:
            raise ValueError(f"sampler {self.name!r} does not record progressive x̂_0")
        log_sig, t = self.grid(spec, schedule)
        x_T, k_chain = initial_noise(key, shape)
        x0 = solve(
            x_T,
            denoise_fn,
            param,
            t,
            log_sig=log_sig,
            eta=self.eta,
            key=k_chain,
            clip=spec.clip_denoised,
        )
        return SampleResult(x0, None)

    def tag(self, spec, num_timesteps):
        rnd = "" if self.opt(spec, "fractional_t") else "_int"
        grid = self.opt(spec, "grid")
        return f"{self.name}{self.steps(spec, num_timesteps)}_{grid}{rnd}"

    def describe(self, spec, num_timesteps):
        k = self.steps(spec, num_timesteps)
        grid = "log-SNR-uniform" if self.opt(spec, "grid") == "logsnr" else "time-uniform"
        t = "fractional t" if self.opt(spec, "fractional_t") else "integer t"
        return f"{self.label} K={k}-step, {grid} grid, {t} (NFE {k})"

    def problems(self, spec, config, where) -> List[str]:
        p = denoiser.mean_type_problems(self.name, config.diffusion.mean_type)
        sect = f"config.sample.{self.name}"
        g = self.opt(spec, "grid")
        if g not in grids.GRIDS:
            p.append(f"{sect}.grid={g!r} is not allowed; choose one of {sorted(grids.GRIDS)}")
        if not isinstance(self.opt(spec, "fractional_t"), bool):
            p.append(
                f"{sect}.fractional_t={self.opt(spec, 'fractional_t')!r} must be True or False"
            )
        return p


class DPMSolverPP2M(_DPMSolverPP):
    """DPM-Solver++(2M), the deterministic multistep solver (η = 0). Options
    (``config.sample.dpmpp_2m``): ``grid`` ``'logsnr'`` | ``'time'``; ``fractional_t``."""

    name = "dpmpp_2m"
    label = "DPM-Solver++(2M)"


class DPMSolverPP2MSDE(_DPMSolverPP):
    """DPM-Solver++(2M) SDE (η = 1): fresh noise each step, the variance of the reverse SDE's
    exact linear part. Options (``config.sample.dpmpp_2m_sde``) as `DPMSolverPP2M`."""

    name = "dpmpp_2m_sde"
    label = "DPM-Solver++(2M) SDE"
    eta = 1.0


register(DPMSolverPP2M())
register(DPMSolverPP2MSDE())
