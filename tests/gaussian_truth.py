"""Closed-form truth for data x_0 ~ N(m, s² I) under a discrete DDPM schedule, in float64 NumPy
(independent of the library: the tests compare the samplers against it).

With x_t = √ᾱ x_0 + √(1−ᾱ) ε, x_t is Gaussian with mean √ᾱ m and variance ᾱ s² + 1 − ᾱ, and

  E[ε | x_t] = √(1−ᾱ) (x_t − √ᾱ m) / (ᾱ s² + 1 − ᾱ)                     (affine in x_t).

The probability-flow ODE in the VE view x̃ = x/√ᾱ, σ² = (1−ᾱ)/ᾱ, is dx̃/dσ = (x̃ − E[x_0|x̃])/σ
with E[x_0|x̃] = m + s²/(s² + σ²) (x̃ − m); its solutions are x̃ − m = c √(s² + σ²), so the map
from x_T at ᾱ_T to σ = 0 is

  x_0 = m + (x_T − √ᾱ_T m) · s / √(ᾱ_T s² + 1 − ᾱ_T),

whatever path σ(t) takes in between (the ODE is invariant under reparameterising σ).
"""

from __future__ import annotations

import numpy as np


def alpha_bar_at(betas, t):
    """ᾱ at (fractional) ``t``: log σ² = log((1−ᾱ)/ᾱ) linear between integer steps (the
    continuous view of a discrete schedule used by k-diffusion); own float64 implementation."""
    betas = np.asarray(betas, np.float64)
    abar = np.cumprod(1.0 - betas)
    log_sig2 = np.log((1.0 - abar) / abar)
    s2 = np.exp(np.interp(np.asarray(t, np.float64), np.arange(len(betas)), log_sig2))
    return 1.0 / (1.0 + s2)


def eps_posterior_mean(x_t, alpha_bar, m, s):
    """E[ε | x_t] for x_0 ~ N(m, s²)."""
    a, b2 = np.sqrt(alpha_bar), 1.0 - alpha_bar
    return np.sqrt(b2) * (x_t - a * m) / (alpha_bar * s * s + b2)


def ode_map(x_T, alpha_bar_T, m, s):
    """The exact probability-flow ODE map from x_T (at ᾱ_T) to x_0."""
    a = np.sqrt(alpha_bar_T)
    return m + (np.asarray(x_T, np.float64) - a * m) * s / np.sqrt(
        alpha_bar_T * s * s + 1 - alpha_bar_T
    )


def solver_limit(x_T, alpha_bar_T, alpha_bar_min, m, s):
    """What an exact ODE solve to σ_min = σ(t=0) followed by the samplers' shared last step
    (x_0 = D(x̃; σ_min), the denoiser at σ_min: DDIM's step to ᾱ = 1, Heun's final Euler step,
    DPM-Solver++'s first-order final step) returns: ``ode_map`` shrunk towards m by
    s/√(s² + σ_min²). That last step's error does not fall with the number of steps (about
    1 − 5.6e-4 of |x_0 − m| for s = 0.3 on the linear schedule), so the order tests compare with
    this limit."""
    sig2_min = (1.0 - alpha_bar_min) / alpha_bar_min
    return m + (ode_map(x_T, alpha_bar_T, m, s) - m) * s / np.sqrt(s * s + sig2_min)


def ode_map_rk4(x_T, sigma_T, m, s, n=20000):
    """The same map by a fine fixed-step RK4 on dx̃/du = (x̃ − E[x_0|x̃]) (u = log σ), from
    σ_T to σ = 1e-8 (an independent check of `ode_map`)."""
    x = np.asarray(x_T, np.float64) * np.sqrt(1.0 + sigma_T**2)

    def f(x, u):
        sig2 = np.exp(2 * u)
        return x - (m + s * s / (s * s + sig2) * (x - m))

    u0, u1 = np.log(sigma_T), np.log(1e-8)
    h = (u1 - u0) / n
    u = u0
    for _ in range(n):
        k1 = f(x, u)
        k2 = f(x + h / 2 * k1, u + h / 2)
        k3 = f(x + h / 2 * k2, u + h / 2)
        k4 = f(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        u += h
    return x
