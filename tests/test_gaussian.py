"""The forward process, posterior and reverse parameterisations against independent truth:
Monte Carlo of the Markov chain, Bayes' rule on a grid, the paper's Eq. 11 in float64 NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian as G
from diffusion.schedules import get_beta_schedule, make_schedule

BETAS = get_beta_schedule("linear")
SCHED = make_schedule("linear")


@pytest.mark.slow
def test_q_sample_marginal_equals_iterated_markov_chain():
    """x_t from q_sample vs x_t from t applications of q(x_t|x_{t-1}) = N(√(1−β)x, β)."""
    n = 100_000
    rng = np.random.default_rng(0)
    x0 = np.float32(0.7)
    for t in [0, 9, 199, 999]:
        x = np.full(n, x0, np.float64)
        for s in range(t + 1):  # code index t = paper step t+1: t+1 transitions
            x = np.sqrt(1 - BETAS[s]) * x + np.sqrt(BETAS[s]) * rng.standard_normal(n)
        noise = jax.random.normal(jax.random.key(t), (n, 1))
        xq = np.asarray(G.q_sample(SCHED, jnp.full((n, 1), x0), jnp.full((n,), t), noise))[:, 0]
        var = x.var()
        se_mean = math.sqrt(var / n) * math.sqrt(2)  # difference of two sample means
        se_var = var * math.sqrt(2 / (n - 1)) * math.sqrt(2)  # difference of two sample variances
        assert abs(xq.mean() - x.mean()) < 5 * se_mean, t
        assert abs(xq.var() - var) < 5 * se_var, t


def test_variance_preservation_at_every_t():
    """Unit-variance data keeps unit variance at every step (why x is scaled by √(1−β))."""
    n = 2_000
    T = SCHED.num_timesteps
    x0 = jax.random.normal(jax.random.key(1), (T * n, 1))
    noise = jax.random.normal(jax.random.key(2), (T * n, 1))
    t = jnp.repeat(jnp.arange(T), n)
    xt = np.asarray(G.q_sample(SCHED, x0, t, noise)).reshape(T, n)
    v = xt.var(axis=1)
    se = math.sqrt(2 / (n - 1))
    assert np.all(np.abs(v - 1) < 5 * se)
    assert abs(v.mean() - 1) < 5 * se / math.sqrt(T)  # pooled over all t: much tighter


def test_posterior_equals_bayes_product_on_a_grid():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0), integrated numerically in float64."""
    ac = np.cumprod(1 - BETAS)
    grid = np.linspace(-6, 6, 400_001)
    for t, x0, xt in [(1, 0.5, 0.3), (10, -0.8, 0.1), (500, 0.2, -1.3), (999, 0.9, 0.4)]:
        b = BETAS[t]
        log_lik = -0.5 * (xt - np.sqrt(1 - b) * grid) ** 2 / b
        log_prior = -0.5 * (grid - np.sqrt(ac[t - 1]) * x0) ** 2 / (1 - ac[t - 1])
        w = np.exp(log_lik + log_prior - (log_lik + log_prior).max())
        w /= w.sum()
        mean = (w * grid).sum()
        var = (w * (grid - mean) ** 2).sum()
        m, v, lv = G.q_posterior_mean_variance(
            SCHED, jnp.full((1, 1), x0), jnp.full((1, 1), xt), jnp.array([t])
        )
        assert float(m[0, 0]) == pytest.approx(mean, rel=1e-5, abs=1e-6)
        assert float(v[0, 0]) == pytest.approx(var, rel=1e-4)
        assert float(lv[0, 0]) == pytest.approx(math.log(var), abs=1e-4)


def test_eq11_mean_from_eps_and_exact_x0_recovery():
    rng = np.random.default_rng(3)
    shape = (6, 4, 4, 3)
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    eps = rng.standard_normal(shape).astype(np.float32)
    eps_hat = rng.standard_normal(shape).astype(np.float32)
    t = np.array([1, 5, 50, 300, 700, 999])
    xt = np.asarray(G.q_sample(SCHED, x0, t, eps))
    # Eq. 11 in float64 from the betas alone: μθ = (x_t − β_t/√(1−ᾱ_t) ε̂)/√α_t.
    ac = np.cumprod(1 - BETAS)
    b = BETAS[t][:, None, None, None]
    want = (xt - b / np.sqrt(1 - ac[t])[:, None, None, None] * eps_hat) / np.sqrt(1 - b)
    p = G.p_mean_variance(
        SCHED,
        jnp.asarray(eps_hat),
        jnp.asarray(xt),
        jnp.asarray(t),
        mean_type="eps",
        var_type="fixedlarge",
        clip_denoised=False,
    )
    np.testing.assert_allclose(p.mean, want, rtol=2e-4, atol=2e-4)
    # x0 from the true ε is recovered (float32 round-off grows like √(1/ᾱ_t) ≈ 157 at t=999).
    x0_rec = G.predict_xstart_from_eps(SCHED, xt, t, eps)
    err = np.abs(np.asarray(x0_rec) - x0).max(axis=(1, 2, 3))
    assert (err < 1e-6 * np.sqrt(1 / ac[t]) * 20).all(), err


@pytest.mark.parametrize("mean_type", G.MEAN_TYPES)
def test_true_prediction_gives_true_posterior_for_every_mean_type(mean_type):
    rng = np.random.default_rng(4)
    shape = (5, 2, 2, 3)
    x0 = jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)
    eps = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    t = jnp.array([0, 3, 100, 600, 998])
    xt = G.q_sample(SCHED, x0, t, eps)
    true_mean = G.q_posterior_mean_variance(SCHED, x0, xt, t)[0]
    out = {"eps": eps, "xstart": x0, "xprev": true_mean, "v": G.predict_v(SCHED, x0, t, eps)}[
        mean_type
    ]
    p = G.p_mean_variance(
        SCHED, out, xt, t, mean_type=mean_type, var_type="fixedsmall", clip_denoised=False
    )
    np.testing.assert_allclose(p.mean, true_mean, atol=2e-4)
    np.testing.assert_allclose(p.pred_xstart, x0, atol=5e-3 if mean_type == "xprev" else 2e-4)


def test_variance_types():
    shape = (3, 2, 2, 1)
    xt = jnp.zeros(shape)
    t = jnp.array([0, 1, 999])
    fl = G.p_mean_variance(SCHED, xt, xt, t, mean_type="eps", var_type="fixedlarge")
    fs = G.p_mean_variance(SCHED, xt, xt, t, mean_type="eps", var_type="fixedsmall")
    pv = np.cumprod(1 - BETAS)
    pv_prev = np.append(1, pv[:-1])
    bt = BETAS * (1 - pv_prev) / (1 - pv)  # β̃
    np.testing.assert_allclose(
        fl.log_variance[:, 0, 0, 0], np.log([bt[1], BETAS[1], BETAS[999]]), rtol=1e-5
    )
    np.testing.assert_allclose(
        fs.log_variance[:, 0, 0, 0], np.log([bt[1], bt[1], bt[999]]), rtol=1e-5
    )
    np.testing.assert_allclose(fl.variance, np.exp(fl.log_variance), rtol=1e-6)
    # learned_range: v = +1 → log β, v = −1 → log β̃ (clipped), v = 0 → midpoint.
    for v, want in [(1.0, np.log(BETAS[t])), (-1.0, np.log([bt[1], bt[1], bt[999]]))]:
        out = jnp.concatenate([xt, jnp.full(shape, v)], axis=-1)
        p = G.p_mean_variance(SCHED, out, xt, t, mean_type="eps", var_type="learned_range")
        np.testing.assert_allclose(p.log_variance[:, 0, 0, 0], want, rtol=1e-5)
    out = jnp.concatenate([xt, jnp.full(shape, -3.0)], axis=-1)
    p = G.p_mean_variance(SCHED, out, xt, t, mean_type="eps", var_type="learned")
    assert np.allclose(p.log_variance, -3.0) and np.allclose(p.variance, np.exp(-3.0))


def test_clipping_of_xstart():
    xt = jnp.full((2, 1, 1, 1), 5.0)
    t = jnp.array([10, 10])
    p = G.p_mean_variance(
        SCHED, xt, xt, t, mean_type="xstart", var_type="fixedlarge", clip_denoised=True
    )
    assert float(p.pred_xstart.max()) == 1.0
    p2 = G.p_mean_variance(
        SCHED, xt, xt, t, mean_type="xstart", var_type="fixedlarge", clip_denoised=False
    )
    assert float(p2.pred_xstart.max()) == 5.0


def test_normal_kl_against_monte_carlo():
    rng = np.random.default_rng(5)
    for m1, lv1, m2, lv2 in [(0.3, -1.0, -0.2, 0.5), (1.0, 0.0, 0.0, 0.0), (0.0, -4.0, 0.1, -3.5)]:
        x = m1 + np.exp(0.5 * lv1) * rng.standard_normal(1_000_000)
        logp = lambda x, m, lv: -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))
        d = logp(x, m1, lv1) - logp(x, m2, lv2)
        got = float(G.normal_kl(m1, lv1, m2, lv2))
        assert abs(got - d.mean()) < 5 * d.std() / 1000 + 1e-6
    assert float(G.normal_kl(0.4, -2.0, 0.4, -2.0)) == pytest.approx(0.0, abs=1e-7)


def test_approx_cdf_close_to_erf():
    x = np.linspace(-5, 5, 101)
    exact = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))
    assert (
        np.abs(np.asarray(G.approx_standard_normal_cdf(jnp.asarray(x, jnp.float32))) - exact).max()
        < 2e-3
    )


def test_discretized_likelihood_sums_to_one_over_256_bins():
    bins = jnp.asarray(np.arange(256) / 127.5 - 1, jnp.float32).reshape(256, 1)
    for mean, log_scale in [(0.0, -2.0), (0.73, -4.5), (-0.99, -1.0), (0.1, 0.5), (1.2, -3.0)]:
        ll = G.discretized_gaussian_log_likelihood(
            bins, means=jnp.full((256, 1), mean), log_scales=jnp.full((256, 1), log_scale)
        )
        assert float(jnp.exp(ll).sum()) == pytest.approx(1.0, abs=1e-5), (mean, log_scale)
    # A sharp decoder puts (almost) all mass on the right bin.
    ll = G.discretized_gaussian_log_likelihood(
        bins, means=bins, log_scales=jnp.full((256, 1), -8.0)
    )
    assert float(ll.min()) > -1e-5


def test_jit_vmap_float32_and_broadcasting():
    rng = np.random.default_rng(6)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    eps = jnp.asarray(rng.standard_normal((4, 8, 8, 3)), jnp.float32)
    t = jnp.array([0, 10, 500, 999])
    f = jax.jit(
        lambda s, x, t, e: G.p_mean_variance(
            s, e, G.q_sample(s, x, t, e), t, mean_type="eps", var_type="fixedlarge"
        )
    )
    out = f(SCHED, x0, t, eps)
    assert all(a.dtype == jnp.float32 and a.shape == x0.shape for a in out)
    # vmap over examples (each a batch of 1) equals the batched call.
    g = lambda x, t, e: G.q_sample(SCHED, x[None], t[None], e[None])[0]
    np.testing.assert_allclose(jax.vmap(g)(x0, t, eps), G.q_sample(SCHED, x0, t, eps), rtol=1e-6)
    ll = jax.jit(G.discretized_gaussian_log_likelihood)(
        x0, means=x0, log_scales=jnp.zeros((1, 1, 1, 3))
    )
    assert ll.shape == x0.shape and ll.dtype == jnp.float32


def test_bad_names_and_shapes_raise():
    x = jnp.zeros((2, 4, 4, 3))
    t = jnp.array([1, 2])
    with pytest.raises(ValueError, match=r"Unknown mean_type 'epsilon'.*'eps'"):
        G.p_mean_variance(SCHED, x, x, t, mean_type="epsilon", var_type="fixedlarge")
    with pytest.raises(ValueError, match=r"Unknown var_type 'fixed'.*'fixedsmall'"):
        G.p_mean_variance(SCHED, x, x, t, mean_type="eps", var_type="fixed")
    with pytest.raises(ValueError, match=r"learned_range.*\(2, 4, 4, 6\)"):
        G.p_mean_variance(SCHED, x, x, t, mean_type="eps", var_type="learned_range")
    with pytest.raises(ValueError, match="t must be an int array"):
        G.q_sample(SCHED, x, jnp.array([1, 2, 3]), x)
    with pytest.raises(ValueError, match="integer"):
        G.q_sample(SCHED, x, jnp.array([1.0, 2.0]), x)
    with pytest.raises(ValueError, match="noise shape"):
        G.q_sample(SCHED, x, t, jnp.zeros((2, 4, 4, 1)))
