"""The ODE/SDE samplers against closed-form truth: for data N(m, s²) the exact ε-prediction is
affine in x_t and the probability-flow ODE's map x_T -> x_0 is known (tests/gaussian_truth.py),
so a solver's endpoint error can be measured exactly and must fall with its order as the steps
double; the SDE variant must reproduce N(m, s²)."""

import gaussian_truth as gt
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import samplers
from diffusion.parameterization import Parameterization
from diffusion.schedules import make_schedule

T = 1000
SCHED = make_schedule("linear", beta_start=1e-4, beta_end=0.02, num_timesteps=T)
BETAS = np.asarray(SCHED.betas, np.float64)
ABAR = np.cumprod(1.0 - BETAS)
M, S = 0.1, 0.3  # stiff near t = 0: the order shows past ~20 steps
LOG_SIG2 = np.log((1.0 - ABAR) / ABAR)


def exact_network(mean_type="eps", seen=None):
    """The Bayes-optimal network for N(M, S²) data: E[ε | x_t] (or E[x_0 | x_t], E[v | x_t]) at
    any real t, ᾱ(t) from log σ² linear between integer steps (gaussian_truth.alpha_bar_at)."""
    log_sig2 = jnp.asarray(LOG_SIG2, jnp.float32)

    def fn(x, t):
        if seen is not None:
            jax.debug.callback(lambda v: seen.append(np.asarray(v)), t)
        tt = t.astype(jnp.float32)
        ab = (1.0 / (1.0 + jnp.exp(jnp.interp(tt, jnp.arange(T, dtype=jnp.float32), log_sig2))))[
            :, None, None, None
        ]
        a, b = jnp.sqrt(ab), jnp.sqrt(1.0 - ab)
        eps = b * (x - a * M) / (ab * S * S + 1.0 - ab)
        if mean_type == "eps":
            return eps
        x0 = (x - b * eps) / a
        return x0 if mean_type == "xstart" else a * eps - b * x0  # v = √ᾱ ε − √(1−ᾱ) x_0

    return fn


SHAPE = (16, 2, 2, 1)
KEY = jax.random.key(3)


def _solve(method, k, mean_type="eps", options=(), seen=None, key=KEY, shape=SHAPE):
    spec = samplers.SamplerSpec(method, k, clip_denoised=False, options=tuple(options))
    param = Parameterization(mean_type, "fixedsmall")
    fn = jax.jit(
        lambda key: samplers.draw(spec, SCHED, exact_network(mean_type, seen), shape, key, param).x
    )
    return np.asarray(fn(key), np.float64)


def _endpoint_errors(method, steps, options=()):
    x_T = np.asarray(samplers.initial_noise(KEY, SHAPE)[0], np.float64)
    truth = gt.solver_limit(x_T, ABAR[-1], ABAR[0], M, S)
    return [np.max(np.abs(_solve(method, k, options=options) - truth)) for k in steps]


def test_the_closed_forms_agree_with_sampling_and_a_fine_integrator():
    rng = np.random.default_rng(0)
    x0 = M + S * rng.standard_normal(400_000)
    eps = rng.standard_normal(400_000)
    for t in (0, 300, 999):
        xt = np.sqrt(ABAR[t]) * x0 + np.sqrt(1 - ABAR[t]) * eps
        slope, intercept = np.polyfit(xt, eps, 1)  # E[ε | x_t] is affine: the regression line
        want = gt.eps_posterior_mean(np.array([0.0, 1.0]), ABAR[t], M, S)
        resid = eps - (intercept + slope * xt)
        se_slope = np.sqrt(resid.var() / (xt.size * xt.var()))  # least-squares standard error
        assert abs(slope - (want[1] - want[0])) < 5 * se_slope
        assert abs(
            intercept + slope * xt.mean() - gt.eps_posterior_mean(xt.mean(), ABAR[t], M, S)
        ) < 5 * np.sqrt(resid.var() / xt.size)
    x_T = np.array([-2.5, 0.3, 2.0])
    sigma_T = np.sqrt((1 - ABAR[-1]) / ABAR[-1])
    np.testing.assert_allclose(
        gt.ode_map_rk4(x_T, sigma_T, M, S), gt.ode_map(x_T, ABAR[-1], M, S), atol=1e-9
    )
    # Fractional t: ᾱ(t) lies between its integer neighbours.
    assert ABAR[500] > gt.alpha_bar_at(BETAS, 500.5) > ABAR[501]


@pytest.mark.parametrize(
    "method, options, min_ratio",
    [
        ("ddim", (), 1.7),  # first order (DDIM is DPM-Solver-1 in data prediction)
        ("dpmpp_2m", (("grid", "logsnr"),), 3.0),
        ("heun", (), 3.0),
    ],
)
def test_ode_solvers_converge_with_their_order(method, options, min_ratio):
    errs = _endpoint_errors(method, (20, 40, 80), options)
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    print(method, options, "errors", errs, "ratios per doubling", ratios)
    assert all(r >= min_ratio for r in ratios), (errs, ratios)


def test_dpmpp_2m_on_the_time_uniform_grid_converges_with_second_order_past_40_steps():
    """Uniform in t, the last interior step (from t ≈ T/K to t = 0) spans a large log-SNR
    interval, so the order shows only past ~40 steps (20 -> 40 gains about 2x)."""
    errs = _endpoint_errors("dpmpp_2m", (40, 80, 160), (("grid", "time"),))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    print("dpmpp_2m time", errs, ratios)
    assert all(r >= 3.0 for r in ratios), (errs, ratios)


def test_ddim_50_steps_shrinks_the_std_as_the_first_order_error_predicts():
    """The issue's float64 closed form: 50 DDIM steps on the exact ε give std 0.2745, not 0.3.
    DDIM η = 0 is affine in x_T, so the sample std is |slope| for x_T ~ N(0, 1)."""
    shape = (2, 1, 1, 1)
    x_T = np.asarray(samplers.initial_noise(KEY, shape)[0], np.float64).reshape(-1)
    out = _solve("ddim", 50, shape=shape).reshape(-1)
    slope = (out[1] - out[0]) / (x_T[1] - x_T[0])
    assert abs(abs(slope) - 0.2745) < 5e-4, slope
    exact = gt.solver_limit(x_T, ABAR[-1], ABAR[0], M, S)
    assert abs((exact[1] - exact[0]) / (x_T[1] - x_T[0]) - S) < 1e-3  # the limit keeps s


@pytest.mark.parametrize("mean_type", ["xstart", "v"])
def test_solvers_give_the_same_path_for_every_parameterisation(mean_type):
    """The exact x_0- and v-prediction networks are conversions of the exact ε one, so each
    solver's output must not depend on which the network predicts."""
    for method in ("dpmpp_2m", "heun"):
        np.testing.assert_allclose(
            _solve(method, 10, mean_type=mean_type), _solve(method, 10), atol=2e-5
        )


def test_fractional_t_reaches_the_network_and_rounding_keeps_the_trained_timesteps():
    for method in ("heun", "dpmpp_2m"):
        seen_f, seen_i = [], []
        frac = _solve(method, 40, seen=seen_f)
        rounded = _solve(method, 40, options=(("fractional_t", False),), seen=seen_i)
        tf, ti = np.concatenate(seen_f), np.concatenate(seen_i)
        assert np.any(tf != np.round(tf)) and tf.max() == T - 1 and tf.min() == 0
        assert np.all(ti == np.round(ti)) and ti.max() == T - 1 and ti.min() == 0
        x_T = np.asarray(samplers.initial_noise(KEY, SHAPE)[0], np.float64)
        truth = gt.solver_limit(x_T, ABAR[-1], ABAR[0], M, S)
        # Both solve the same ODE: close to the limit, and to each other.
        print(method, np.max(np.abs(frac - truth)), np.max(np.abs(rounded - truth)))
        assert np.max(np.abs(frac - truth)) < 0.02 and np.max(np.abs(rounded - truth)) < 0.02


def test_dpmpp_2m_sde_reproduces_the_data_distribution():
    """x_0 ~ N(M, S²) in mean and std within sampling error (4 s.e.), from 16,384 chains."""
    shape = (16, 32, 32, 1)
    x = _solve("dpmpp_2m_sde", 50, shape=shape, key=jax.random.key(7)).reshape(-1)
    n = x.size
    assert abs(x.mean() - M) < 4 * S / np.sqrt(n), x.mean()
    assert abs(x.std() - S) < 4 * S / np.sqrt(2 * n), x.std()
    # and it is stochastic: the same x_T with another chain key gives other samples
    assert not np.allclose(
        x, _solve("dpmpp_2m_sde", 50, shape=shape, key=jax.random.key(8)).reshape(-1)
    )


def _k_diffusion_dpmpp_2m(x_T, sigmas, eta, noises):
    """A second implementation: k-diffusion's ``sample_dpmpp_2m`` (eta = 0) and
    ``sample_dpmpp_2m_sde`` (midpoint) in the VE view, float64, with the exact Gaussian
    denoiser, ``sigmas`` ending in 0 and ``noises[i]`` the step noise."""
    den = lambda x, s: M + S * S / (S * S + s * s) * (x - M)  # noqa: E731
    x = x_T * np.sqrt(1.0 + sigmas[0] ** 2)
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        d = den(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = d
            continue
        h = -np.log(sigmas[i + 1]) + np.log(sigmas[i])
        eta_h = eta * h
        x = sigmas[i + 1] / sigmas[i] * np.exp(-eta_h) * x - np.expm1(-h - eta_h) * d
        if old is not None:
            r = h_last / h
            x = x - 0.5 * np.expm1(-h - eta_h) * (1 / r) * (d - old)
        x = x + noises[i] * sigmas[i + 1] * np.sqrt(-np.expm1(-2 * eta_h))
        old, h_last = d, h
    return x


@pytest.mark.parametrize("method, eta", [("dpmpp_2m", 0.0), ("dpmpp_2m_sde", 1.0)])
def test_dpm_solver_matches_the_k_diffusion_formulas(method, eta):
    k = 12
    x_T, k_chain = samplers.initial_noise(KEY, SHAPE)
    noises = [
        np.asarray(jax.random.normal(jax.random.fold_in(k_chain, i), SHAPE)) for i in range(k)
    ]
    sig_max, sig_min = np.sqrt((1 - ABAR[-1]) / ABAR[-1]), np.sqrt((1 - ABAR[0]) / ABAR[0])
    lam = np.linspace(-np.log(sig_max), -np.log(sig_min), k)  # the log-SNR-uniform grid
    sigmas = np.append(np.exp(-lam), 0.0)
    want = _k_diffusion_dpmpp_2m(np.asarray(x_T, np.float64), sigmas, eta, noises)
    np.testing.assert_allclose(_solve(method, k), want, atol=2e-4)


def test_heun_matches_the_k_diffusion_formulas():
    """k-diffusion's ``sample_heun`` (no churn) on ``get_sigmas_karras`` (ρ = 7), float64, the
    exact denoiser: an Euler step, then the trapezoidal correction unless σ_next = 0."""
    k = 8
    x_T = np.asarray(samplers.initial_noise(KEY, SHAPE)[0], np.float64)
    sig_max, sig_min = np.sqrt((1 - ABAR[-1]) / ABAR[-1]), np.sqrt((1 - ABAR[0]) / ABAR[0])
    ramp = np.linspace(0, 1, k)
    sigmas = (sig_max ** (1 / 7) + ramp * (sig_min ** (1 / 7) - sig_max ** (1 / 7))) ** 7
    sigmas = np.append(sigmas, 0.0)
    den = lambda x, s: M + S * S / (S * S + s * s) * (x - M)  # noqa: E731
    x = x_T * np.sqrt(1.0 + sigmas[0] ** 2)
    for i in range(k):
        d = (x - den(x, sigmas[i])) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - den(x2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    np.testing.assert_allclose(_solve("heun", k), x, atol=2e-4)
