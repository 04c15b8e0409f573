"""Noise schedules β_1..β_T and the `Schedule` pytree of precomputed buffers.

Everything is computed in float64 NumPy (the released DDPM code does the same) and cast once to
float32 when a `Schedule` is built. Code index ``t`` runs 0..T-1; paper time is ``t + 1``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import flax.struct
import jax.numpy as jnp
import numpy as np

__all__ = ["BETA_SCHEDULES", "get_beta_schedule", "Schedule", "make_schedule"]


def _linear(beta_start, beta_end, T):
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def _quad(beta_start, beta_end, T):
    return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _const(beta_start, beta_end, T):
    return beta_end * np.ones(T, dtype=np.float64)


def _jsd(beta_start, beta_end, T):
    # 1/T, 1/(T-1), ..., 1: the schedule under which x_t's SNR falls like Jascha Sohl-Dickstein's.
    return 1.0 / np.linspace(T, 1, T, dtype=np.float64)


def _warmup(frac):
    def fn(beta_start, beta_end, T):
        betas = beta_end * np.ones(T, dtype=np.float64)
        warmup_time = int(T * frac)
        betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
        return betas

    return fn


def _cosine(beta_start, beta_end, T, s=0.008, max_beta=0.999):
    # Improved DDPM (Nichol & Dhariwal 2021, Eq. 17): ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T)+s)/(1+s)·π/2).
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.asarray(betas, dtype=np.float64)


BETA_SCHEDULES: Dict[str, Callable[[float, float, int], np.ndarray]] = {
    "linear": _linear,
    "quad": _quad,
    "const": _const,
    "jsd": _jsd,
    "warmup10": _warmup(0.1),
    "warmup50": _warmup(0.5),
    "cosine": _cosine,
}


def get_beta_schedule(
    name: str, *, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000
) -> np.ndarray:
    """Returns the betas β_1..β_T of a named schedule, float64 ``[T]``.

    ``linear`` is the paper's (Sec. 4: 1e-4 → 0.02 over T = 1000); ``quad``, ``const``, ``jsd``,
    ``warmup10``/``warmup50`` are the released code's alternatives; ``cosine`` is Improved DDPM's
    (ignores ``beta_start``/``beta_end``).
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"Unknown beta schedule {name!r}; valid names: {sorted(BETA_SCHEDULES)}")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name != "cosine" and not (0 < beta_start <= beta_end <= 1):
        raise ValueError(
            f"Need 0 < beta_start <= beta_end <= 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    betas = BETA_SCHEDULES[name](float(beta_start), float(beta_end), int(num_timesteps))
    assert betas.shape == (num_timesteps,)
    return betas


@flax.struct.dataclass
class Schedule:
    """Precomputed float32 buffers of the diffusion process, each ``[T]``; a JAX pytree.

    Index with an int array ``t`` of shape ``[B]``: ``schedule.betas[t]``. Built with
    `Schedule.from_betas`; the derivations live in docs/math.md.
    """

    betas: jnp.ndarray  # β_t
    alphas: jnp.ndarray  # α_t = 1 − β_t
    alphas_cumprod: jnp.ndarray  # ᾱ_t = Π_{s≤t} α_s
    alphas_cumprod_prev: jnp.ndarray  # ᾱ_{t−1}, with ᾱ_{−1} = 1
    sqrt_alphas_cumprod: jnp.ndarray  # √ᾱ_t
    sqrt_one_minus_alphas_cumprod: jnp.ndarray  # √(1−ᾱ_t)
    log_one_minus_alphas_cumprod: jnp.ndarray  # log(1−ᾱ_t)
    sqrt_recip_alphas_cumprod: jnp.ndarray  # √(1/ᾱ_t)
    sqrt_recipm1_alphas_cumprod: jnp.ndarray  # √(1/ᾱ_t − 1)
    log_betas: jnp.ndarray  # log β_t
    fixedlarge_log_variance: jnp.ndarray  # log([β̃_1, β_1..]) i.e. log β with t=0 → log β̃[1]
    posterior_variance: jnp.ndarray  # β̃_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t)
    posterior_log_variance_clipped: jnp.ndarray  # log([β̃[1], β̃[1:]])
    posterior_mean_coef1: jnp.ndarray  # β_t √ᾱ_{t−1} / (1−ᾱ_t)      (multiplies x0)
    posterior_mean_coef2: jnp.ndarray  # (1−ᾱ_{t−1}) √α_t / (1−ᾱ_t)   (multiplies x_t)

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        """Builds all buffers from betas ``[T]`` in float64, stored as float32.

        Raises ValueError if betas are not a 1-D array of values in (0, 1].
        """
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] < 1:
            raise ValueError(f"betas must be a non-empty 1-D array [T], got shape {betas.shape}")
        if not np.all(np.isfinite(betas)) or not ((betas > 0).all() and (betas <= 1).all()):
            bad = np.flatnonzero(~((betas > 0) & (betas <= 1)))[:5]
            raise ValueError(
                f"betas must lie in (0, 1]; offending indices {bad.tolist()} "
                f"with values {betas[bad].tolist()}"
            )
        T = betas.shape[0]
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
            # β̃_0 = 0: clip its log by the next value (the released code's choice).
            first = post_var[1] if T > 1 else betas[0]
            post_logvar = np.log(np.append(first, post_var[1:]))
            fixedlarge_logvar = np.log(np.append(first, betas[1:]))
            coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
            coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
            log_one_minus_ac = np.log(1.0 - ac)
            log_betas = np.log(betas)
            # jsd ends at β = 1, so ᾱ_T = 0 and these are inf there, as in the released code.
            sqrt_recip_ac = np.sqrt(1.0 / ac)
            sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1.0)
        f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
        return cls(
            betas=f32(betas),
            alphas=f32(alphas),
            alphas_cumprod=f32(ac),
            alphas_cumprod_prev=f32(ac_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(ac)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
            log_one_minus_alphas_cumprod=f32(log_one_minus_ac),
            sqrt_recip_alphas_cumprod=f32(sqrt_recip_ac),
            sqrt_recipm1_alphas_cumprod=f32(sqrt_recipm1_ac),
            log_betas=f32(log_betas),
            fixedlarge_log_variance=f32(fixedlarge_logvar),
            posterior_variance=f32(post_var),
            posterior_log_variance_clipped=f32(post_logvar),
            posterior_mean_coef1=f32(coef1),
            posterior_mean_coef2=f32(coef2),
        )


def make_schedule(
    name: str = "linear",
    *,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_timesteps: int = 1000,
) -> Schedule:
    """`Schedule.from_betas(get_beta_schedule(...))`: the usual way to get a schedule."""
    return Schedule.from_betas(
        get_beta_schedule(
            name, beta_start=beta_start, beta_end=beta_end, num_timesteps=num_timesteps
        )
    )
