"""The variational bound in bits/dim (`diffusion.likelihood`) against closed forms.

Gaussian data x_0 ~ N(m, s²) (continuous, independent per pixel) with the optimal network
E[x_0 | x_t] = m + √ᾱ s²(x_t − √ᾱ m)/D, D = ᾱs² + 1 − ᾱ, gives for t > 0 and σ_t² = β̃_t
(fixedsmall):
  KL(q(x_{t−1}|x_t,x_0) ‖ pθ(x_{t−1}|x_t)) = (μ̃(x_0,x_t) − μ̃(x̂_0,x_t))² / (2β̃_t)
                                          = coef1_t² (x_0 − E[x_0|x_t])² / (2β̃_t)     (nats/pixel),
and x_0 − E[x_0|x_t] ~ N(0, V_t), V_t = Var[x_0|x_t] = s²(1−ᾱ_t)/D, so
  E[KL_t] = coef1_t² V_t / (2β̃_t),  Var[KL_t per pixel] = 2 E[KL_t]²      (a scaled χ²₁),
and E[mse_t] = V_t with Var = 2V_t² per pixel. With the true reverse variance
σ_t² = β̃_t + coef1_t² V_t (a perfect learned Σ), E[KL_t] = ½ log(σ_t²/β̃_t). Tolerance: 5 standard errors of the batch mean,
SE = E·√(2/n) with n = B·pixels. The t = 0 term is the discrete decoder, checked separately with an
oracle network on 8-bit data. The paper's schedule (T = 1000) is used: one scan of 1000 elementwise
steps on 10k numbers costs about a second.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian as G
from diffusion import likelihood as LK
from diffusion import losses as L
from diffusion.schedules import get_beta_schedule, make_schedule

BETAS = get_beta_schedule("linear")
SCHED = make_schedule("linear")
T = 1000
ABAR = np.cumprod(1.0 - BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])
POST_VAR = BETAS * (1 - ABAR_PREV) / (1 - ABAR)
COEF1 = BETAS * np.sqrt(ABAR_PREV) / (1 - ABAR)
M, SD = 0.1, 0.5
SHAPE = (2_500, 2, 2, 1)  # n = 10,000 scalars: 5 SE = 5·√(2/n) = 7.1 % of each expectation
KEY = jax.random.key(0)
# `gaussian.normal_kl` writes −1 + e^d as expm1(d), so equal variances give exactly 0 and no
# float32 floor is needed (with the naive form each term was off by up to 3.4e-7 bits).
KL_FLOOR_BITS = 0.0


def gaussian_denoiser(sched, m, s, mean_type="eps", var_half=None):
    """Optimal network for N(m, s²) data (see the module docstring); t = original index."""

    def fn(x, t):
        ab = sched.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        d = ab * s * s + 1.0 - ab
        if mean_type == "eps":
            out = jnp.sqrt(1.0 - ab) * (x - jnp.sqrt(ab) * m) / d
        else:
            out = m + jnp.sqrt(ab) * s * s * (x - jnp.sqrt(ab) * m) / d
        if var_half is not None:
            v = jnp.asarray(var_half)[t].reshape((-1,) + (1,) * (x.ndim - 1))
            out = jnp.concatenate([out, jnp.broadcast_to(v, x.shape)], -1)
        return out

    return fn


def posterior_var_x0(abar, s):
    return s * s * (1.0 - abar) / (abar * s * s + 1.0 - abar)


@pytest.fixture(scope="module")
def gaussian_data():
    return M + SD * jax.random.normal(jax.random.key(11), SHAPE)


def _bpd(fn, x0, **kw):
    return jax.jit(functools.partial(LK.bits_per_dim, SCHED, fn, **kw))(x0, key=KEY)


@pytest.mark.slow
@pytest.mark.parametrize("mean_type", ["eps", "xstart"])
def test_kl_terms_and_mse_match_closed_form_for_gaussian_data(gaussian_data, mean_type):
    out = _bpd(
        gaussian_denoiser(SCHED, M, SD, mean_type),
        gaussian_data,
        mean_type=mean_type,
        var_type="fixedsmall",
        clip_denoised=False,
    )
    n = gaussian_data.size
    assert out["terms_bpd"].shape == (SHAPE[0], T) and out["mse"].shape == (SHAPE[0], T)
    assert out["total_bpd"].shape == out["prior_bpd"].shape == (SHAPE[0],)
    V = posterior_var_x0(ABAR, SD)
    # KL terms, t ≥ 1, bits/dim
    with np.errstate(divide="ignore", invalid="ignore"):  # t = 0: β̃ = 0, not compared
        want = COEF1**2 * V / (2 * POST_VAR) / math.log(2)
    got = np.asarray(out["terms_bpd"], np.float64).mean(0)
    se = want * math.sqrt(2.0 / n)
    bad = np.flatnonzero(np.abs(got[1:] - want[1:]) > 5 * se[1:] + KL_FLOOR_BITS) + 1
    assert bad.size == 0, (bad[:10], got[bad[:5]], want[bad[:5]])
    # their sum (the bound without decoder and prior); SE of a sum ≤ sum of SEs
    assert abs(got[1:].sum() - want[1:].sum()) < 5 * se[1:].sum() + (T - 1) * KL_FLOOR_BITS
    # distortion: E[(x̂0 − x0)²] = Var[x0 | x_t] at every t, t = 0 included
    got_mse = np.asarray(out["mse"], np.float64).mean(0)
    bad = np.flatnonzero(np.abs(got_mse - V) > 5 * V * math.sqrt(2.0 / n))
    assert bad.size == 0, (bad[:10], got_mse[bad[:5]], V[bad[:5]])


@pytest.mark.slow
def test_kl_terms_with_true_reverse_variance(gaussian_data):
    """σ_t² = β̃_t + coef1_t²·V_t (learned log σ², exact): E[KL_t] = ½ log(σ_t²/β̃_t)."""
    V = posterior_var_x0(ABAR, SD)
    sig2 = POST_VAR + COEF1**2 * V
    logvar = np.log(sig2).astype(np.float32)
    out = _bpd(
        gaussian_denoiser(SCHED, M, SD, "eps", logvar),
        gaussian_data,
        mean_type="eps",
        var_type="learned",
    )
    got = np.asarray(out["terms_bpd"], np.float64).mean(0)[1:]
    want = 0.5 * np.log(sig2[1:] / POST_VAR[1:]) / math.log(2)
    k = 0.5 * (COEF1**2 * V / sig2)[1:] / math.log(2)  # scale of the χ²₁ part
    se = k * math.sqrt(2.0 / gaussian_data.size)
    bad = np.flatnonzero(np.abs(got - want) > 5 * se + KL_FLOOR_BITS)
    assert bad.size == 0, (bad[:10] + 1, got[bad[:5]], want[bad[:5]])
    # the true variance lowers every term versus fixedsmall: KL_fixed − KL_true ≥ 0 in expectation
    assert np.all(want <= (COEF1**2 * V)[1:] / (2 * POST_VAR[1:]) / math.log(2) + 1e-12)


def _eight_bit(shape, seed):
    k = np.random.default_rng(seed).integers(0, 256, shape)
    return jnp.asarray(k / 127.5 - 1.0, jnp.float32)


def test_oracle_network_leaves_only_decoder_and_prior():
    """A network that knows x0 (xstart oracle, fixedsmall) makes every KL term zero; the t = 0 term
    is the decoder's −log₂ of the Gaussian mass of x0's bin with σ = √β̃_1 (exact Φ here, the tanh
    approximation in the code: agreement to 2e-3 bits) and the prior is
    ½(−log(1−ᾱ) − ᾱ + ᾱx²)/ln2."""
    x0 = _eight_bit((3, 4, 4, 3), 0)
    oracle = lambda x, t: x0
    out = _bpd(oracle, x0, mean_type="xstart", var_type="fixedsmall")
    terms = np.asarray(out["terms_bpd"], np.float64)
    assert np.abs(terms[:, 1:]).max() < 1e-6
    sigma = math.sqrt(POST_VAR[1])
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    x = np.asarray(x0, np.float64)
    inner = -math.log2(phi(1 / 255 / sigma) - phi(-1 / 255 / sigma))
    edge = -math.log2(phi(1 / 255 / sigma))
    want0 = np.where(np.abs(x) > 0.999, edge, inner).reshape(3, -1).mean(1)
    np.testing.assert_allclose(terms[:, 0], want0, atol=2e-3)
    aT = ABAR[-1]
    want_prior = (0.5 * (-math.log1p(-aT) - aT + aT * x**2)).reshape(3, -1).mean(1) / math.log(2)
    np.testing.assert_allclose(out["prior_bpd"], want_prior, rtol=1e-3, atol=1e-8)
    np.testing.assert_allclose(
        out["total_bpd"], terms.sum(1) + np.asarray(out["prior_bpd"]), rtol=1e-6
    )
    np.testing.assert_allclose(out["mse"], 0.0, atol=1e-12)


@pytest.mark.slow
def test_columns_are_vb_terms_at_t_with_fold_in_noise_and_rate_distortion():
    """Wiring: column t equals `losses.vb_terms_bpd` at t with noise normal(fold_in(key, t)), on
    8-bit data with a clipped eps network and fixedlarge; total = Σ terms + prior; and the
    rate–distortion bookkeeping."""
    sched = make_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=100)
    x0 = _eight_bit((3, 4, 4, 2), 1)
    fn = gaussian_denoiser(sched, 0.0, 0.6, "eps")
    kw = dict(mean_type="eps", var_type="fixedlarge", clip_denoised=True)
    out = jax.jit(functools.partial(LK.bits_per_dim, sched, fn, **kw))(x0, key=KEY)

    @jax.jit
    def direct(t):
        tb = jnp.full((3,), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(KEY, t), x0.shape)
        x_t = G.q_sample(sched, x0, tb, noise)
        terms, x0_hat = L.vb_terms_bpd(sched, fn(x_t, tb), x0, x_t, tb, **kw)
        return terms, L.mean_flat((x0_hat - x0) ** 2)

    for t in (0, 1, 37, 99):
        want, want_mse = direct(t)
        np.testing.assert_allclose(out["terms_bpd"][:, t], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["mse"][:, t], want_mse, rtol=1e-5)
    np.testing.assert_allclose(out["prior_bpd"], L.prior_bpd(sched, x0), rtol=1e-6)
    np.testing.assert_allclose(
        out["total_bpd"], out["terms_bpd"].sum(1) + out["prior_bpd"], rtol=1e-6
    )
    assert np.all(np.asarray(out["terms_bpd"]) >= -1e-6)
    rd = LK.rate_distortion(out)
    assert rd["rate_bpd"].shape == rd["distortion_rmse"].shape == (3, 100)
    np.testing.assert_allclose(rd["rate_bpd"][:, -1], out["prior_bpd"], rtol=1e-6)
    np.testing.assert_allclose(rd["rate_bpd"][:, 0], rd["rate"], rtol=1e-5)
    np.testing.assert_allclose(rd["rate"] + rd["distortion"], out["total_bpd"], rtol=1e-5)
    np.testing.assert_allclose(rd["distortion_rmse"], np.sqrt(out["mse"]) * 127.5, rtol=1e-6)
    assert np.all(np.diff(np.asarray(rd["rate_bpd"]), axis=1) <= 1e-6)  # rate grows as t falls


def test_different_keys_give_different_noise_same_key_same_result():
    x0 = _eight_bit((2, 2, 2, 1), 2)
    sched = make_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=20)
    f = jax.jit(
        functools.partial(
            LK.bits_per_dim,
            sched,
            gaussian_denoiser(sched, 0.0, 0.6),
            mean_type="eps",
            var_type="fixedsmall",
        )
    )
    a, b, c = f(x0, jax.random.key(1)), f(x0, jax.random.key(1)), f(x0, jax.random.key(2))
    np.testing.assert_array_equal(a["terms_bpd"], b["terms_bpd"])
    assert not np.allclose(a["terms_bpd"][:, 1:], c["terms_bpd"][:, 1:])


@pytest.mark.slow
def test_mse_clipped_is_the_distortion_of_the_clipped_estimate():
    """Without clipping in the bound, ``mse`` is of the raw x̂_0 (huge near t = T for an imperfect
    ε network: its error is amplified by 1/√ᾱ_t) and ``mse_clipped`` of x̂_0 clipped to [−1, 1]."""
    sched = make_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=100)
    x0 = _eight_bit((3, 4, 4, 2), 2)
    fn = gaussian_denoiser(sched, 0.0, 0.6, "eps")
    bad_fn = lambda x, t: fn(x, t) * 0.8  # noqa: E731  (a deliberately imperfect network)
    kw = dict(mean_type="eps", var_type="fixedlarge", clip_denoised=False)
    out = jax.jit(functools.partial(LK.bits_per_dim, sched, bad_fn, **kw))(x0, key=KEY)
    for t in (0, 50, 99):
        tb = jnp.full((3,), t, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(KEY, t), x0.shape)
        x_t = G.q_sample(sched, x0, tb, noise)
        ab = float(sched.alphas_cumprod[t])
        x0_hat = (np.asarray(x_t) - math.sqrt(1 - ab) * np.asarray(bad_fn(x_t, tb))) / math.sqrt(ab)
        want = ((x0_hat - np.asarray(x0)) ** 2).reshape(3, -1).mean(1)
        want_c = ((np.clip(x0_hat, -1, 1) - np.asarray(x0)) ** 2).reshape(3, -1).mean(1)
        np.testing.assert_allclose(out["mse"][:, t], want, rtol=1e-4)
        np.testing.assert_allclose(out["mse_clipped"][:, t], want_c, rtol=1e-4)
    assert float(out["mse"][:, 99].mean()) > 10 * float(out["mse_clipped"][:, 99].mean())
    assert np.all(np.asarray(out["mse_clipped"]) <= 4.0 + 1e-6)


# ----------------------------------------------------------------------------- bound_estimate
def _small_sched(T=20):
    return make_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=T)


@pytest.mark.slow
def test_bound_estimate_with_all_steps_is_bits_per_dim_and_samples_are_its_columns():
    """K = T − 1 reproduces `bits_per_dim`'s total with the same key (se 0): every term uses the
    same ε; with K = 3 each sampled term is `bits_per_dim`'s column at that example's t."""
    sched = _small_sched()
    x0 = _eight_bit((3, 4, 4, 2), 3)
    fn = gaussian_denoiser(sched, 0.0, 0.6, "eps")
    kw = dict(mean_type="eps", var_type="fixedlarge", clip_denoised=True)
    full = jax.jit(functools.partial(LK.bits_per_dim, sched, fn, **kw))(x0, KEY)
    est = functools.partial(LK.bound_estimate, sched, fn, **kw)
    out = jax.jit(functools.partial(est, num_sampled_timesteps=19))(x0, KEY)
    np.testing.assert_allclose(out["total_bpd"], full["total_bpd"], rtol=1e-5)
    np.testing.assert_array_equal(out["total_bpd_se"], 0.0)
    np.testing.assert_allclose(out["prior_bpd"], full["prior_bpd"], rtol=1e-6)
    np.testing.assert_allclose(out["decoder_bpd"], full["terms_bpd"][:, 0], rtol=1e-6)
    assert int(out["num_sampled_timesteps"]) == 19
    ts = np.asarray(out["timesteps"])
    assert ts.shape == (3, 19) and ts.dtype == np.int32
    np.testing.assert_array_equal(np.sort(ts, axis=1), np.tile(np.arange(1, 20), (3, 1)))
    assert not np.array_equal(ts[0], ts[1])  # per-example draws

    out3 = jax.jit(functools.partial(est, num_sampled_timesteps=3))(x0, KEY)
    ts3 = np.asarray(out3["timesteps"])
    assert ts3.shape == out3["terms_bpd"].shape == (3, 3)
    assert ts3.min() >= 1 and ts3.max() <= 19
    assert all(len(set(r)) == 3 for r in ts3.tolist())  # without replacement
    np.testing.assert_allclose(
        out3["terms_bpd"],
        np.take_along_axis(np.asarray(full["terms_bpd"]), ts3, 1),
        rtol=1e-5,
        atol=1e-7,
    )
    terms = np.asarray(out3["terms_bpd"], np.float64)
    np.testing.assert_allclose(
        out3["total_bpd"],
        np.asarray(full["prior_bpd"]) + np.asarray(full["terms_bpd"][:, 0]) + 19 / 3 * terms.sum(1),
        rtol=1e-5,
    )
    want_se = 19 * np.sqrt((1 - 3 / 19) * terms.var(1, ddof=1) / 3)
    np.testing.assert_allclose(out3["total_bpd_se"], want_se, rtol=1e-4)

    # aggregation over batches: a dict or a list of per-batch dicts
    y, se = np.asarray(out3["total_bpd"], np.float64), np.asarray(out3["total_bpd_se"], np.float64)
    parts = [
        {k: (v[:1] if np.ndim(v) else v) for k, v in out3.items()},
        {k: (v[1:] if np.ndim(v) else v) for k, v in out3.items()},
    ]
    for agg in (LK.aggregate_bound_estimates(out3), LK.aggregate_bound_estimates(parts)):
        assert agg["num_examples"] == 3 and agg["num_sampled_timesteps"] == 3
        np.testing.assert_allclose(agg["total_bpd"], y.mean(), rtol=1e-12)
        np.testing.assert_allclose(agg["total_bpd_se"], y.std(ddof=1) / math.sqrt(3), rtol=1e-12)
        np.testing.assert_allclose(agg["timestep_se"], math.sqrt((se**2).sum()) / 3, rtol=1e-12)


@pytest.mark.slow
def test_bound_estimate_is_unbiased_and_its_se_is_the_sampling_std():
    """Over R keys with K = 3 of N = 19 steps, an xstart network x̂_0 = 0.8·x_0 + 0.05 + c·x_t
    (fixedsmall): (a) c = 0, x̂_0 ignores x_t, makes every term independent of ε
    (μ̃(x_0,x_t) − μ̃(x̂_0,x_t) = coef1·(x_0 − x̂_0)), so the full bound F is one number per example
    and the exact variance of the estimate is the without-replacement V = N²(1 − K/N)S²/K, S² the
    variance of the 19 terms: the mean of the estimates is F within 4 standard errors, their
    variance is V, and E[se²] = V; (b) c = 0.1, terms depend on ε: estimate − `bits_per_dim`(same
    key) has mean 0 within 4 standard errors and variance E[se²]."""
    sched, K, N, R = _small_sched(), 3, 19, 2000
    x0 = _eight_bit((4, 2, 2, 1), 4)
    keys = jax.random.split(jax.random.key(5), R)
    kw = {"mean_type": "xstart", "var_type": "fixedsmall"}

    @jax.jit
    def run(c):
        fn = lambda x, t: 0.8 * x0 + 0.05 + c * x  # noqa: E731
        est = jax.vmap(
            lambda k: LK.bound_estimate(sched, fn, x0, k, num_sampled_timesteps=K, **kw)
        )(keys)
        full = jax.vmap(lambda k: LK.bits_per_dim(sched, fn, x0, k, **kw))(keys)
        return est["total_bpd"], est["total_bpd_se"], full["total_bpd"], full["terms_bpd"]

    # (a) deterministic terms
    y, se, F, terms = (np.asarray(v, np.float64) for v in run(0.0))  # [R, B] ([R, B, T])
    np.testing.assert_allclose(F, np.broadcast_to(F[0], F.shape), rtol=1e-5)
    V = N * N * (1 - K / N) * terms[0, :, 1:].var(1, ddof=1) / K  # [B]
    assert np.all(np.abs(y.mean(0) - F[0]) < 4 * y.std(0, ddof=1) / math.sqrt(R)), (
        y.mean(0),
        F[0],
        y.std(0) / math.sqrt(R),
    )
    np.testing.assert_allclose(y.var(0, ddof=1), V, rtol=0.25)
    np.testing.assert_allclose((se**2).mean(0), V, rtol=0.25)
    # the reported se against the spread across keys: its root mean square is the std; se itself
    # is a K = 3 estimate and usually small (the t = 1 term dominates S² and is seldom drawn)
    np.testing.assert_allclose(np.sqrt((se**2).mean(0)) / y.std(0, ddof=1), 1.0, atol=0.12)

    # (b) ε-dependent terms: paired with bits_per_dim on the same keys
    y, se, F, _ = (np.asarray(v, np.float64) for v in run(0.1))
    assert not np.allclose(F[0], F[1])  # the noise does matter
    d = y - F  # [R, B]
    assert np.all(np.abs(d.mean(0)) < 4 * d.std(0, ddof=1) / math.sqrt(R)), (
        d.mean(0),
        d.std(0) / math.sqrt(R),
    )
    np.testing.assert_allclose((se**2).mean(0), d.var(0, ddof=1), rtol=0.25)


@pytest.mark.parametrize("k", [0, 20, -1, 2.0, True])
def test_bound_estimate_rejects_bad_num_sampled_timesteps(k):
    sched = _small_sched()
    with pytest.raises(ValueError, match=r"num_sampled_timesteps.*\[1, 19\]"):
        LK.bound_estimate(
            sched,
            gaussian_denoiser(sched, 0.0, 0.6),
            _eight_bit((1, 2, 2, 1), 0),
            KEY,
            num_sampled_timesteps=k,
            mean_type="eps",
            var_type="fixedsmall",
        )
