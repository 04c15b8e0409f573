"""Step grids for the ODE/SDE solvers on a trained model's discrete schedule, in float64 NumPy.

The discrete schedule gives ᾱ_t at the trained code indices t = 0..T−1, i.e. the noise level
σ_t = √((1−ᾱ_t)/ᾱ_t) of the variance-exploding view x̃ = x/√ᾱ = x_0 + σ ε (Karras et al. 2022,
Eq. 1 with s(t) = √ᾱ), and the log-SNR λ_t = −log σ_t (Lu et al. 2022). Between trained timesteps
log σ is interpolated linearly in t (k-diffusion's ``DiscreteSchedule.t_to_sigma``), which makes
σ(t) continuous and monotone on [0, T−1] and gives every σ in [σ_0, σ_{T−1}] a fractional t.

A grid is a descending float64 array ``t [K]`` of the K points where the network is called,
from t = T−1 (σ_max) to t = 0 (σ_min); the solvers append a final step to σ = 0 (x_0 itself).
"""

from __future__ import annotations

import jax
import numpy as np

from diffusion import sampling
from diffusion.schedules import Schedule

__all__ = [
    "log_sigmas",
    "sigma_at",
    "t_at_sigma",
    "time_uniform",
    "logsnr_uniform",
    "karras",
    "snap_to_integers",
    "GRIDS",
]


def log_sigmas(schedule: Schedule) -> np.ndarray:
    """``[T]`` float64 log σ_t = ½ log((1−ᾱ_t)/ᾱ_t), with ᾱ_t = Π_{s≤t}(1−β_s) formed in float64
    from the schedule's betas (increasing in t for any valid schedule)."""
    betas = schedule.betas
    if isinstance(betas, jax.core.Tracer):
        raise ValueError(
            "the solvers' step grids need concrete schedule values (float64 NumPy): close over "
            "the schedule instead of passing it as a jit argument"
        )
    log_abar = np.cumsum(np.log1p(-np.asarray(betas, dtype=np.float64)))
    # log((1−ᾱ)/ᾱ) = log(expm1(−log ᾱ)): accurate when ᾱ is close to 1 (t = 0).
    return 0.5 * np.log(np.expm1(-log_abar))


def sigma_at(log_sig: np.ndarray, t) -> np.ndarray:
    """σ(t) for fractional ``t`` in [0, T−1]: log σ interpolated linearly between trained
    timesteps. ``log_sig``: `log_sigmas` ``[T]``; returns float64 of ``t``'s shape."""
    return np.exp(np.interp(np.asarray(t, np.float64), np.arange(len(log_sig)), log_sig))


def t_at_sigma(log_sig: np.ndarray, sigma) -> np.ndarray:
    """The fractional t with σ(t) = ``sigma`` (the inverse of `sigma_at`, clamped to
    [0, T−1])."""
    return np.interp(np.log(np.asarray(sigma, np.float64)), log_sig, np.arange(len(log_sig)))


def _check(k: int, num_timesteps: int) -> int:
    k = int(k)
    if not 1 <= k <= num_timesteps:
        raise ValueError(f"a grid needs 1..{num_timesteps} points, got {k}")
    return k


def time_uniform(log_sig: np.ndarray, k: int) -> np.ndarray:
    """K integer timesteps evenly spaced over [0, T−1], both ends kept (`sampling.space_timesteps`,
    the grid of the respaced chain and DDIM), descending."""
    T = len(log_sig)
    return np.asarray(sampling.space_timesteps(T, _check(k, T))[::-1], dtype=np.float64)


def logsnr_uniform(log_sig: np.ndarray, k: int) -> np.ndarray:
    """K fractional timesteps evenly spaced in log-SNR λ = −log σ from λ(T−1) to λ(0) (Lu et al.
    2022, Sec. 3.4's recommended grid for DPM-Solver), descending in t."""
    T = len(log_sig)
    k = _check(k, T)
    if k == 1:
        return np.asarray([T - 1.0])
    lam = np.linspace(-log_sig[-1], -log_sig[0], k)
    t = t_at_sigma(log_sig, np.exp(-lam))
    t[0], t[-1] = T - 1.0, 0.0  # exact ends (no round trip through exp/log)
    return t


def karras(log_sig: np.ndarray, k: int, rho: float = 7.0) -> np.ndarray:
    """The Karras et al. (2022, Eq. 5) grid σ_i = (σ_max^{1/ρ} + i/(K−1) (σ_min^{1/ρ} −
    σ_max^{1/ρ}))^ρ, i = 0..K−1, with σ_max = σ(T−1), σ_min = σ(0); returned as the fractional
    timesteps of those σ (descending)."""
    T = len(log_sig)
    k = _check(k, T)
    if k == 1:
        return np.asarray([T - 1.0])
    smax, smin = np.exp(log_sig[-1]), np.exp(log_sig[0])
    ramp = np.linspace(0.0, 1.0, k)
    sig = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    t = t_at_sigma(log_sig, sig)
    t[0], t[-1] = T - 1.0, 0.0
    return t


def snap_to_integers(t: np.ndarray) -> np.ndarray:
    """``t`` rounded to the trained timesteps, duplicates dropped (descending): for models whose
    time input must be an integer (diffusers' choice for its Karras / λ grids). The grid may
    lose points where it is denser than the integers (near t = 0 for many steps)."""
    return np.unique(np.round(np.asarray(t, np.float64)))[::-1].copy()


GRIDS = {"time": time_uniform, "logsnr": logsnr_uniform}
