"""Samplers against analytic truth (tests/test_sampling.py).

Gaussian data x_0 ~ N(m, s²), independent per pixel, has a closed-form optimal network (the
minimiser of every L2 training loss, i.e. a perfectly trained model):
  E[ε | x_t]  = √(1−ᾱ)(x_t − √ᾱ m)/D,   E[x_0 | x_t] = m + √ᾱ s²(x_t − √ᾱ m)/D,   D = ᾱs² + 1 − ᾱ,
  Var[x_0 | x_t] = s²(1−ᾱ)/D.
Fed to a sampler (as ε, x_0, v or posterior-mean predictions), every reverse step is affine in x_t
plus Gaussian noise, x_{t−1} = A_t x_t + b_t + σ_t z, started from x_T ~ N(0, 1). The output is
therefore exactly Gaussian, with a mean and variance that `chain_moments` computes in float64 from
the betas alone (independently of the code under test). The samples must match those within
5 standard errors; how far those exact moments sit from (m, s²) is the sampler's discretisation
bias, which each test states (and asserts as an upper bound).

Schedule: linear β from 1e-3 to 0.2 over T = 100 (SHORT: the paper's 1e-4..0.02 scaled ×10; the
tiny config also runs T = 100 with β_T = 0.2). It keeps the paper's ᾱ_T ≈ 4e-5 (x_T ≈ N(0, 1))
with a tenth of the steps, so 80,000-sample chains run in well under a second on CPU (the random draws dominate). Its coarser
steps make the fixed-variance biases larger than at T = 1000 (fixedsmall −12 % instead of −1.6 %),
which makes the tests more discriminating, not less: every sampler is compared with its own exact
moments. One test runs the paper's schedule itself (T = 1000, the CIFAR10 eps/fixedlarge setting).
"""

import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from diffusion import gaussian as G
from diffusion import sampling as S
from diffusion.evaluation import generator
from diffusion.schedules import Schedule, get_beta_schedule, make_schedule

BETAS = get_beta_schedule("linear")  # the paper's, float64
SCHED = make_schedule("linear")
ABAR = np.cumprod(1.0 - BETAS)  # float64 truth
T = 1000
SHORT = make_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=100)
ABAR_S = np.cumprod(
    1.0 - get_beta_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=100)
)
M, SD = 0.1, 0.5  # data N(0.1, 0.5²): 95 % of it inside [−1, 1]; never clipped here
B, PIX = 20_000, (2, 2, 1)  # 80,000 independent scalars per run: SE(var)/var = √(2/n) = 0.5 %
KEY = jax.random.key(0)


# ------------------------------------------------------------------ closed-form truth
def denoiser(sched, m, s, mean_type, var_half=None):
    """The optimal network for N(m, s²) data as ``denoise_fn(x_t, t)`` (float32; t is the
    ORIGINAL index).

    ``var_half``: optional ``[T]`` array appended as the variance half (learned var types)."""
    ab_all = sched.alphas_cumprod
    c1_all, c2_all = sched.posterior_mean_coef1, sched.posterior_mean_coef2

    def fn(x, t):
        r = lambda a: a[t].reshape((-1,) + (1,) * (x.ndim - 1))
        ab = r(ab_all)
        d = ab * s * s + 1.0 - ab
        eps = jnp.sqrt(1.0 - ab) * (x - jnp.sqrt(ab) * m) / d
        x0 = m + jnp.sqrt(ab) * s * s * (x - jnp.sqrt(ab) * m) / d
        if mean_type == "eps":
            out = eps
        elif mean_type == "xstart":
            out = x0
        elif mean_type == "v":
            out = jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * x0
        elif mean_type == "xprev":
            out = r(c1_all) * x0 + r(c2_all) * x
        else:
            raise ValueError(mean_type)
        if var_half is not None:
            out = jnp.concatenate([out, jnp.broadcast_to(r(jnp.asarray(var_half)), x.shape)], -1)
        return out

    return fn


def posterior_var_x0(abar, s):
    """Var[x_0 | x_t] = s²(1−ᾱ)/(ᾱs² + 1−ᾱ), float64, elementwise in ᾱ."""
    abar = np.asarray(abar, np.float64)
    return s * s * (1.0 - abar) / (abar * s * s + 1.0 - abar)


def step_coefs(abar_kept):
    """Per chain step i (over kept ᾱ's): β_i, β̃_i, coef1_i, coef2_i, ᾱ_{i−1}, float64."""
    a = np.asarray(abar_kept, np.float64)
    ap = np.append(1.0, a[:-1])
    beta = 1.0 - a / ap
    bt = beta * (1.0 - ap) / (1.0 - a)
    c1 = beta * np.sqrt(ap) / (1.0 - a)
    c2 = (1.0 - ap) * np.sqrt(1.0 - beta) / (1.0 - a)
    return beta, bt, c1, c2, ap


def exact_ancestral_variance(abar_kept, s):
    """σ_i² = Var[x_{i−1} | x_i] of the true reverse process: β̃_i + coef1_i² Var[x_0 | x_i]."""
    _, bt, c1, _, _ = step_coefs(abar_kept)
    return bt + c1**2 * posterior_var_x0(abar_kept, s)


def chain_moments(abar_kept, m, s, *, sampler, var=None, eta=0.0):
    """Exact (mean, variance) of the sampler's output for the optimal predictor, float64.

    sampler 'ancestral' with var in {'fixedsmall', 'fixedlarge', 'exact'} or a ``[K]`` array of σ²;
    sampler 'ddim' with ``eta``. x_T ~ N(0, 1); no noise at the last step."""
    a_all = np.asarray(abar_kept, np.float64)
    beta, bt, c1, c2, ap_all = step_coefs(a_all)
    if sampler == "ancestral":
        if isinstance(var, str):
            sig2_all = {
                "fixedsmall": bt,
                "fixedlarge": beta,
                "exact": exact_ancestral_variance(a_all, s),
            }[var]
        else:
            sig2_all = np.asarray(var, np.float64)
    mu, v = 0.0, 1.0
    for i in range(len(a_all) - 1, -1, -1):
        a, ap = a_all[i], ap_all[i]
        d = a * s * s + 1.0 - a
        g = np.sqrt(a) * s * s / d  # x̂0 = g x + h
        h = m - g * np.sqrt(a) * m
        if sampler == "ancestral":
            A, b = c1[i] * g + c2[i], c1[i] * h
            sig2 = sig2_all[i]
        else:
            sig = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
            ce = np.sqrt(max(1 - ap - sig * sig, 0.0)) / np.sqrt(1 - a)  # ε̂ = (x − √a x̂0)/√(1−a)
            A = np.sqrt(ap) * g + ce * (1 - np.sqrt(a) * g)
            b = np.sqrt(ap) * h - ce * np.sqrt(a) * h
            sig2 = sig * sig
        if i == 0:
            sig2 = 0.0
        mu, v = A * mu + b, A * A * v + sig2
    return mu, v


def check_moments(x, mu, var, var_bias_bound, label):
    """Sample moments vs the exact chain moments (5 SE) and vs the data (5 SE + stated bias)."""
    x = np.asarray(x, np.float64).ravel()
    n = x.size
    se_m, se_v = math.sqrt(var / n), var * math.sqrt(2.0 / (n - 1))
    assert np.all(np.isfinite(x)), label
    assert abs(x.mean() - mu) < 5 * se_m, (label, x.mean(), mu, se_m)
    assert abs(x.var() - var) < 5 * se_v, (label, x.var(), var, se_v)
    # Discretisation bias of the sampler itself (exact numbers, stated per test).
    assert abs(mu - M) < 1e-3, (label, mu)
    assert abs(var / SD**2 - 1) <= var_bias_bound, (label, var / SD**2 - 1)
    assert abs(x.var() - SD**2) < 5 * se_v + var_bias_bound * SD**2, label


def _run(fn, **kw):
    return np.asarray(jax.jit(functools.partial(fn, **kw))(key=KEY))


SHAPE = (B,) + PIX


# ------------------------------------------------------------------ full ancestral chain (Alg. 2)
# Stated variance biases (exact, SHORT, s = 0.5): fixedsmall −12.3 %, fixedlarge +3.1 %, the true
# reverse variance β̃ + coef1²·Var[x0|x_t] (a perfect learned Σ) −0.40 % (= −Var[x0|x_0]/s², the
# price of adding no noise at the last step). Mean biases are < 1e-5.
@pytest.mark.parametrize(
    "mean_type,var_type,bias",
    [
        ("eps", "fixedsmall", 0.13),
        ("xstart", "fixedsmall", 0.13),
        ("v", "fixedsmall", 0.13),
        ("xprev", "fixedsmall", 0.13),
        ("eps", "fixedlarge", 0.035),
        ("eps", "learned", 0.005),
    ],
)
def test_ancestral_gaussian_data_matches_exact_moments(mean_type, var_type, bias):
    var_half = None
    if var_type == "learned":  # the network outputs the true reverse log-variance
        var_half = np.log(np.maximum(exact_ancestral_variance(ABAR_S, SD), 1e-30))
        var_half = var_half.astype(np.float32)
    fn = denoiser(SHORT, M, SD, mean_type, var_half)
    x = _run(
        S.ancestral_sample,
        schedule=SHORT,
        denoise_fn=fn,
        shape=SHAPE,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=False,
    )
    assert x.shape == SHAPE and x.dtype == np.float32
    mu, var = chain_moments(
        ABAR_S, M, SD, sampler="ancestral", var="exact" if var_type == "learned" else var_type
    )
    check_moments(x, mu, var, bias, (mean_type, var_type))


def test_ancestral_paper_schedule_t1000_eps_fixedlarge():
    """The CIFAR10 setting on the paper's schedule; stated variance bias +0.30 % (exact)."""
    fn = denoiser(SCHED, M, SD, "eps")
    x = _run(
        S.ancestral_sample,
        schedule=SCHED,
        denoise_fn=fn,
        shape=(5_000,) + PIX,
        mean_type="eps",
        var_type="fixedlarge",
        clip_denoised=False,
    )
    mu, var = chain_moments(ABAR, M, SD, sampler="ancestral", var="fixedlarge")
    check_moments(x, mu, var, 0.005, "T=1000")


# ------------------------------------------------------------------ respaced (Improved DDPM)
K = 25
KEPT = S.space_timesteps(100, K)


def _learned_range_exact_output():
    """The learned_range output v ∈ [−1, 1] that makes the respaced variance the true one."""
    beta, bt, c1, _, _ = step_coefs(ABAR_S[KEPT])
    sig2 = exact_ancestral_variance(ABAR_S[KEPT], SD)
    lo = np.log(np.append(bt[1], bt[1:]))  # posterior_log_variance_clipped of the respaced chain
    hi = np.log(beta)
    frac = (np.log(np.maximum(sig2, 1e-30)) - lo) / (hi - lo)
    frac[0] = 0.0  # last step adds no noise
    assert np.all((frac[1:] >= 0) & (frac[1:] <= 1))
    out = np.zeros(100, np.float32)
    out[KEPT] = 2 * frac - 1
    return out


# Stated variance biases with 25 of 100 steps (exact): fixedsmall −34.5 % (fixedlarge would be
# +15.1 %: fixed variances need many steps, Improved DDPM's reason to learn Σ), the true variance
# through learned_range −0.40 % (as the full chain). xprev checks the conversion of an original
# one-step posterior-mean output to x̂0.
@pytest.mark.parametrize(
    "mean_type,var_type,bias",
    [("eps", "fixedsmall", 0.35), ("xprev", "fixedsmall", 0.35), ("eps", "learned_range", 0.005)],
)
def test_respaced_gaussian_data_matches_exact_moments(mean_type, var_type, bias):
    var_half = _learned_range_exact_output() if var_type == "learned_range" else None
    fn = denoiser(SHORT, M, SD, mean_type, var_half)
    x = _run(
        S.respaced_sample,
        schedule=SHORT,
        denoise_fn=fn,
        shape=SHAPE,
        num_steps=K,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=False,
    )
    mu, var = chain_moments(
        ABAR_S[KEPT],
        M,
        SD,
        sampler="ancestral",
        var="exact" if var_type == "learned_range" else var_type,
    )
    check_moments(x, mu, var, bias, (mean_type, var_type))


# ------------------------------------------------------------------ DDIM (Song et al. 2021)
# Stated variance biases (exact): full chain η=0 −5.6 %; 25 of 100 steps η=0 −20.0 %, η=1 −34.5 %.
# (Full chain η=1 is the ancestral fixedsmall sampler: see the same-key test below.)
@pytest.mark.parametrize(
    "num_steps,eta,mean_type,var_type,bias",
    [
        (None, 0.0, "eps", "fixedlarge", 0.06),
        (K, 0.0, "eps", "fixedlarge", 0.21),
        (K, 1.0, "eps", "fixedlarge", 0.35),
        (K, 0.0, "xstart", "learned", 0.21),
    ],
)  # learned: the variance half (garbage here) is ignored
def test_ddim_gaussian_data_matches_exact_moments(num_steps, eta, mean_type, var_type, bias):
    var_half = np.full(100, 7.0, np.float32) if var_type == "learned" else None
    fn = denoiser(SHORT, M, SD, mean_type, var_half)
    x = _run(
        S.ddim_sample,
        schedule=SHORT,
        denoise_fn=fn,
        shape=SHAPE,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=False,
        eta=eta,
        num_steps=num_steps,
    )
    kept = ABAR_S if num_steps is None else ABAR_S[KEPT]
    mu, var = chain_moments(kept, M, SD, sampler="ddim", eta=eta)
    check_moments(x, mu, var, bias, (num_steps, eta))


def test_ddim_eta1_step_is_the_ancestral_fixedsmall_step():
    """σ_t(η=1)² = β̃_t and the DDIM mean equals μ̃(x̂0, x_t), at every t of the paper schedule."""
    t = jnp.arange(T, dtype=jnp.int32)
    x = jax.random.normal(jax.random.key(3), (T, 3, 1, 2))
    out = jax.random.normal(jax.random.key(4), (T, 3, 1, 2))
    for mt in ("eps", "xstart", "v"):
        mean, std, x0 = S.ddim_mean_std(
            SCHED, out, x, t, mean_type=mt, var_type="fixedsmall", clip_denoised=True, eta=1.0
        )
        p = G.p_mean_variance(
            SCHED, out, x, t, mean_type=mt, var_type="fixedsmall", clip_denoised=True
        )
        np.testing.assert_allclose(mean, p.mean, atol=2e-5, rtol=1e-4)
        np.testing.assert_array_equal(x0, p.pred_xstart)
        want_var = BETAS * (1 - np.append(1.0, ABAR[:-1])) / (1 - ABAR)
        np.testing.assert_allclose(np.asarray(std).ravel() ** 2, want_var, rtol=2e-4, atol=1e-12)
    _, std0, _ = S.ddim_mean_std(SCHED, out, x, t, mean_type="eps", var_type="fixedsmall", eta=0.0)
    assert float(jnp.max(std0)) == 0.0


def test_ddim_eta1_full_chain_reproduces_ancestral_samples_with_same_key():
    fn = denoiser(SHORT, M, SD, "eps")
    kw = dict(
        schedule=SHORT,
        denoise_fn=fn,
        shape=(64, 2, 2, 1),
        mean_type="eps",
        var_type="fixedsmall",
        clip_denoised=True,
    )
    a = _run(S.ancestral_sample, **kw)
    d = _run(S.ddim_sample, eta=1.0, **kw)
    np.testing.assert_allclose(d, a, atol=2e-5)


# ------------------------------------------------------------------ keys, noise, shapes, indices
def _const_xstart(c=0.37):
    return lambda x, t: jnp.full(x.shape, c, x.dtype)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_same_key_same_samples(sampler):
    fn = denoiser(SHORT, M, SD, "eps")
    f = {
        "ancestral": S.ancestral_sample,
        "ddim": functools.partial(S.ddim_sample, eta=1.0),
        "respaced": functools.partial(S.respaced_sample, num_steps=10),
    }[sampler]
    g = functools.partial(f, SHORT, fn, (4, 3, 3, 2), mean_type="eps", var_type="fixedlarge")
    jg = jax.jit(g)
    a, b, c = jg(jax.random.key(1)), jg(jax.random.key(1)), jg(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 0.1


@pytest.mark.parametrize(
    "sampler,var_type",
    [("ancestral", "learned"), ("respaced", "fixedlarge"), ("ddim", "fixedlarge")],
)
def test_no_noise_at_the_last_step(sampler, var_type):
    """A constant x̂0 predictor makes the last step's mean exactly c (coef1=1, coef2=0 at t=0), so
    any noise added there (σ² = β̃_1 for fixedlarge, e² = 7.4 for this 'learned') would show."""
    base = _const_xstart()
    fn = (
        base
        if var_type != "learned"
        else (lambda x, t: jnp.concatenate([base(x, t), jnp.full(x.shape, 2.0)], -1))
    )
    f = {
        "ancestral": S.ancestral_sample,
        "ddim": functools.partial(S.ddim_sample, eta=1.0),
        "respaced": functools.partial(S.respaced_sample, num_steps=7),
    }[sampler]
    x = jax.jit(
        functools.partial(
            f, SHORT, fn, (8, 2, 2, 1), mean_type="xstart", var_type=var_type, clip_denoised=False
        )
    )(KEY)
    np.testing.assert_array_equal(x, np.float32(0.37))


@pytest.mark.parametrize("every", [1, 30])
def test_progressive_records_xstart_at_the_right_steps(every):
    """x̂0 = t (unclipped) reveals which step each entry came from; the last is the final x̂0."""
    fn = lambda x, t: jnp.broadcast_to(t.astype(x.dtype).reshape(-1, 1, 1, 1), x.shape)
    x, prog = jax.jit(
        functools.partial(
            S.ancestral_sample,
            SHORT,
            fn,
            (3, 2, 2, 1),
            mean_type="xstart",
            var_type="fixedsmall",
            clip_denoised=False,
            return_progressive_every=every,
        )
    )(KEY)
    ts = S.progressive_timesteps(99, every)
    assert prog.shape == (len(ts), 3, 2, 2, 1) and len(ts) == 99 // every + 1
    assert ts[-1] == 0 and np.all(np.diff(ts) == -every)
    np.testing.assert_array_equal(prog[:, 0, 0, 0, 0], ts.astype(np.float32))
    np.testing.assert_array_equal(prog[-1], x)


@pytest.mark.slow
def test_progressive_last_entry_is_final_sample_and_ancestral_equals_decode_from_x_T():
    fn = denoiser(SHORT, M, 0.8, "eps")
    shape, kw = (6, 4, 4, 3), dict(mean_type="eps", var_type="fixedlarge")
    x, prog = jax.jit(
        functools.partial(S.ancestral_sample, SHORT, fn, shape, return_progressive_every=10, **kw)
    )(KEY)
    np.testing.assert_array_equal(prog[-1], x)
    assert prog.shape == (10,) + shape and float(jnp.abs(prog).max()) <= 1.0  # clipped x̂0
    y = jax.jit(functools.partial(S.ancestral_sample, SHORT, fn, shape, **kw))(KEY)
    np.testing.assert_array_equal(x, y)  # recording does not change the chain
    k_init, k_chain = jax.random.split(KEY)  # the documented key split
    z = jax.jit(functools.partial(S.decode, SHORT, fn, t=99, **kw))(
        jax.random.normal(k_init, shape), key=k_chain
    )
    np.testing.assert_array_equal(y, z)


@pytest.mark.parametrize("sampler", ["respaced", "ddim"])
def test_respaced_chains_call_the_network_with_original_indices(sampler):
    fn = lambda x, t: jnp.broadcast_to(t.astype(x.dtype).reshape(-1, 1, 1, 1), x.shape)
    f = S.respaced_sample if sampler == "respaced" else S.ddim_sample
    _, prog = jax.jit(
        functools.partial(
            f,
            SHORT,
            fn,
            (2, 1, 1, 1),
            num_steps="ddim10",
            mean_type="xstart",
            var_type="fixedsmall",
            clip_denoised=False,
            return_progressive_every=1,
        )
    )(KEY)
    want = np.arange(90, -1, -10).astype(np.float32)  # "ddim10" keeps 0, 10, ..., 90
    np.testing.assert_array_equal(prog[:, 0, 0, 0, 0], want)


def test_respaced_learned_variance_is_refused():
    with pytest.raises(ValueError, match="learned"):
        S.respaced_sample(
            SHORT,
            _const_xstart(),
            (1, 1, 1, 1),
            KEY,
            num_steps=10,
            mean_type="xstart",
            var_type="learned",
        )


# ------------------------------------------------------------------ respacing
def test_space_timesteps_variants():
    k = S.space_timesteps(1000, 50)
    assert len(k) == 50 and k[0] == 0 and k[-1] == 999
    assert max(np.diff(k)) - min(np.diff(k)) <= 1  # evenly spaced up to rounding
    assert S.space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert S.space_timesteps(1000, 1000) == list(range(1000))
    two = S.space_timesteps(100, "10,5")
    assert len(two) == 15 and two[:10] == S.space_timesteps(50, 10)
    with pytest.raises(ValueError):
        S.space_timesteps(100, "ddim33")
    with pytest.raises(ValueError):
        S.space_timesteps(10, 11)


def test_respace_all_steps_reproduces_the_schedule():
    sched, tmap = S.respace_schedule(BETAS, range(T))
    np.testing.assert_array_equal(tmap, np.arange(T))
    ref = Schedule.from_betas(BETAS)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
        np.testing.assert_allclose(
            getattr(sched, name), getattr(ref, name), rtol=1e-6, err_msg=name
        )
    np.testing.assert_array_equal(sched.betas, ref.betas)
    same, _ = S.respace_schedule(SCHED, range(T))
    assert same is SCHED


@pytest.mark.parametrize("source", ["betas", "schedule"])
@pytest.mark.parametrize("spacing", [10, 50, "ddim25", "5,10,20"])
def test_respace_preserves_alpha_bar_at_kept_steps(source, spacing):
    kept = S.space_timesteps(T, spacing)
    sched, tmap = S.respace_schedule(BETAS if source == "betas" else SCHED, kept)
    assert sched.num_timesteps == len(kept)
    np.testing.assert_array_equal(tmap, kept)
    np.testing.assert_array_equal(sched.alphas_cumprod, np.asarray(SCHED.alphas_cumprod)[kept])
    # β_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}} in float64
    want = 1 - ABAR[kept] / np.append(1.0, ABAR[kept][:-1])
    np.testing.assert_allclose(sched.betas, want, rtol=2e-4 if source == "schedule" else 1e-6)


def test_respace_under_jit_with_traced_schedule_explains():
    f = jax.jit(
        lambda sch, k: S.respaced_sample(
            sch,
            _const_xstart(),
            (1, 1, 1, 1),
            k,
            num_steps=10,
            mean_type="xstart",
            var_type="fixedsmall",
        )
    )
    with pytest.raises(ValueError, match="close over the schedule"):
        f(SHORT, KEY)


# ------------------------------------------------------------------ interpolation (Sec. 4.4)
@pytest.mark.slow
def test_interpolation_endpoints_equal_decoding_a_and_b_alone():
    fn = denoiser(SHORT, 0.0, 0.5, "eps")
    a = jax.random.uniform(jax.random.key(5), (2, 4, 4, 3), minval=-1, maxval=1)
    b = jax.random.uniform(jax.random.key(6), (2, 4, 4, 3), minval=-1, maxval=1)
    kw = dict(mean_type="eps", var_type="fixedlarge")
    t = 15  # ᾱ_15 ≈ 0.76: the endpoints stay recognisable
    lambdas = jnp.array([0.0, 0.25, 0.5, 1.0])
    out = jax.jit(functools.partial(S.interpolate, SHORT, fn, t=t, **kw))(a, b, lambdas, key=KEY)
    assert out.shape == (4, 2, 4, 4, 3)
    k_enc, k_dec = jax.random.split(KEY)
    k_a, k_b = jax.random.split(k_enc)
    eps_a, eps_b = jax.random.normal(k_a, a.shape), jax.random.normal(k_b, a.shape)
    tb = jnp.full((2,), t, jnp.int32)
    dec = jax.jit(functools.partial(S.decode, SHORT, fn, t=t, **kw))
    # The paper (and the released code) encode each source with its own draw from q(x_t|x_0).
    np.testing.assert_allclose(out[0], dec(G.q_sample(SHORT, a, tb, eps_a), key=k_dec), atol=1e-6)
    np.testing.assert_allclose(out[3], dec(G.q_sample(SHORT, b, tb, eps_b), key=k_dec), atol=1e-6)
    assert float(jnp.abs(out[0] - out[3]).mean()) > 0.1
    assert float(jnp.abs(out[1] - out[0]).mean()) < float(jnp.abs(out[3] - out[0]).mean())
    # Opt-in shared noise: one ε for both endpoints.
    shared = jax.jit(functools.partial(S.interpolate, SHORT, fn, t=t, shared_noise=True, **kw))(
        a, b, lambdas, key=KEY
    )
    eps = jax.random.normal(k_enc, a.shape)
    np.testing.assert_allclose(shared[0], dec(G.q_sample(SHORT, a, tb, eps), key=k_dec), atol=1e-6)
    np.testing.assert_allclose(shared[3], dec(G.q_sample(SHORT, b, tb, eps), key=k_dec), atol=1e-6)
    assert float(jnp.abs(shared[3] - out[3]).mean()) > 1e-3  # the two modes really differ


# ------------------------------------------------------------------ uint8 and batched sampling
def test_to_uint8_rounds_and_clips_and_round_trips_8bit_data():
    k = np.arange(256)
    x = (k / 127.5 - 1).astype(np.float32)
    np.testing.assert_array_equal(S.to_uint8(x), k.astype(np.uint8))
    np.testing.assert_array_equal(S.to_uint8(jnp.asarray(x)), k.astype(np.uint8))
    np.testing.assert_array_equal(
        S.to_uint8(np.array([-3.0, -1.0, 0.0, 1.0, 5.0, 0.004])),
        np.array([0, 0, 128, 255, 255, 128], np.uint8),
    )  # 127.5 → 128
    assert S.to_uint8(jnp.zeros(2)).dtype == jnp.uint8


def _small_sample_fn(k, n):
    return S.ancestral_sample(
        SHORT,
        denoiser(SHORT, 0.0, 0.5, "eps"),
        (n, 4, 4, 3),
        k,
        mean_type="eps",
        var_type="fixedlarge",
    )


@pytest.mark.slow
def test_sample_in_batches_one_device_mesh_equals_no_mesh():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    a = generator.sample_in_batches(_small_sample_fn, 10, 4, KEY, mesh=mesh)  # with progress output
    assert a.shape == (10, 4, 4, 3) and a.dtype == np.uint8  # last batch truncated
    f = generator.sample_in_batches(_small_sample_fn, 10, 4, KEY, as_uint8=False, progress=False)
    assert f.dtype == np.float32 and f.shape == (10, 4, 4, 3)
    np.testing.assert_array_equal(S.to_uint8(f), a)
    # batch i is sampled with fold_in(fold_in(key, process_index), i)
    first = np.asarray(
        jax.jit(_small_sample_fn, static_argnums=1)(
            jax.random.fold_in(jax.random.fold_in(KEY, 0), 2), 4
        )
    )
    np.testing.assert_array_equal(f[8:], first[:2])
    with pytest.raises(ValueError, match="'data'"):
        generator.sample_in_batches(
            _small_sample_fn, 4, 4, KEY, mesh=Mesh(np.array(jax.devices()[:1]), ("x",))
        )


_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, {tests!r})
    import test_sampling as TS
    from diffusion import sampling as S
    from diffusion.evaluation import generator
    assert len(jax.devices()) == 2, jax.devices()
    m1 = Mesh(np.array(jax.devices()[:1]), ("data",))
    m2 = Mesh(np.array(jax.devices()), ("data",))
    kw = dict(progress=False, as_uint8=False)
    a = generator.sample_in_batches(TS._small_sample_fn, 12, 4, TS.KEY, mesh=m1, **kw)
    b = generator.sample_in_batches(TS._small_sample_fn, 12, 4, TS.KEY, mesh=m2, **kw)
    try:
        generator.sample_in_batches(TS._small_sample_fn, 12, 3, TS.KEY, mesh=m2, **kw)
        err = ""
    except ValueError as e:
        err = str(e)
    print(json.dumps(dict(max12=float(np.abs(a - b).max()),
                          u8=bool((S.to_uint8(a) == S.to_uint8(b)).all()), err=err,
                          shape=list(b.shape))))
""")


@pytest.mark.slow
def test_sample_in_batches_two_device_mesh_matches_one_device():
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(tests_dir)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-c", _TWO_DEVICE_SCRIPT.format(tests=tests_dir)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["shape"] == [12, 4, 4, 3]
    assert out["max12"] <= 1e-6 and out["u8"], out
    assert "divisible" in out["err"], out
