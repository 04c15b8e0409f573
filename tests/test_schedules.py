"""Schedules against the paper's / released code's reference values and exact high-precision math."""

import math
from decimal import Decimal, getcontext

import jax
import numpy as np
import pytest

from diffusion.schedules import BETA_SCHEDULES, Schedule, get_beta_schedule, make_schedule

getcontext().prec = 50


def _decimal_linear(T=1000, start="1e-4", end="0.02"):
    """The linear schedule and its products in 50-digit decimal arithmetic (independent truth)."""
    s, e = Decimal(start), Decimal(end)
    betas = [s + (e - s) * i / (T - 1) for i in range(T)]
    ac, prod = [], Decimal(1)
    for b in betas:
        prod *= 1 - b
        ac.append(prod)
    return betas, ac


@pytest.fixture(scope="module")
def sched():
    return make_schedule("linear")


def test_reference_values_from_reference_md(sched):
    # The numbers printed in docs/reference.md, at the precision they are printed with.
    assert float(sched.betas[1]) == pytest.approx(1.1992e-4, abs=0.5e-8)
    assert float(sched.alphas_cumprod[999]) == pytest.approx(4.0358e-5, abs=0.5e-9)
    assert float(sched.sqrt_alphas_cumprod[999]) == pytest.approx(0.0063528, abs=0.5e-7)
    assert float(sched.posterior_variance[1]) == pytest.approx(5.4532e-5, abs=0.5e-9)
    assert float(sched.posterior_log_variance_clipped[0]) == pytest.approx(-9.8167, abs=0.5e-4)
    assert float(sched.posterior_log_variance_clipped[1]) == pytest.approx(-9.8167, abs=0.5e-4)
    assert float(sched.posterior_variance[999]) == pytest.approx(0.0199999835, rel=1e-6)
    assert float(sched.posterior_mean_coef1[0]) == 1.0
    assert float(sched.posterior_mean_coef2[0]) == 0.0


def test_buffers_match_50_digit_arithmetic_to_1e6_relative(sched):
    betas, ac = _decimal_linear()
    for t in [0, 1, 2, 10, 100, 500, 998, 999]:
        b, a = betas[t], ac[t]
        a_prev = ac[t - 1] if t > 0 else Decimal(1)
        alpha = 1 - b
        want = {
            "betas": b,
            "alphas_cumprod": a,
            "alphas_cumprod_prev": a_prev,
            "sqrt_alphas_cumprod": a.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / a).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(),
            "posterior_mean_coef1": b * a_prev.sqrt() / (1 - a),
            "posterior_mean_coef2": (1 - a_prev) * alpha.sqrt() / (1 - a),
            "log_one_minus_alphas_cumprod": (1 - a).ln(),
        }
        if t > 0:
            pv = b * (1 - a_prev) / (1 - a)
            want["posterior_variance"] = pv
            want["posterior_log_variance_clipped"] = pv.ln()
        for name, value in want.items():
            got = float(getattr(sched, name)[t])
            assert got == pytest.approx(float(value), rel=1e-6, abs=1e-12), (name, t)


def test_buffers_are_float32_pytree_and_jittable(sched):
    leaves = jax.tree.leaves(sched)
    assert len(leaves) == 15 and all(
        leaf.dtype == np.float32 and leaf.shape == (1000,) for leaf in leaves
    )
    assert sched.num_timesteps == 1000
    doubled = jax.jit(lambda s: jax.tree.map(lambda x: 2 * x, s))(sched)
    assert isinstance(doubled, Schedule)
    np.testing.assert_allclose(doubled.betas, 2 * np.asarray(sched.betas))


def test_all_named_schedules_closed_forms():
    T = 1000
    for name in BETA_SCHEDULES:
        b = get_beta_schedule(name, num_timesteps=T)
        assert b.dtype == np.float64 and b.shape == (T,) and (b > 0).all() and (b <= 1).all(), name
        Schedule.from_betas(b)  # valid
    q = get_beta_schedule("quad")
    assert q[0] == pytest.approx(1e-4) and q[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(np.sqrt(q)), (math.sqrt(0.02) - math.sqrt(1e-4)) / 999)
    assert (get_beta_schedule("const") == 0.02).all()
    j = get_beta_schedule("jsd")
    assert j[-1] == 1.0 and j[0] == pytest.approx(1 / 1000) and j[499] == pytest.approx(1 / 501)
    w = get_beta_schedule("warmup10")
    assert np.allclose(w[:100], np.linspace(1e-4, 0.02, 100)) and (w[100:] == 0.02).all()
    w = get_beta_schedule("warmup50")
    assert np.allclose(w[:500], np.linspace(1e-4, 0.02, 500)) and (w[500:] == 0.02).all()
    c = get_beta_schedule("cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    ac = np.cumprod(1 - c)
    for t in [0, 100, 500, 900]:  # unclipped region: ᾱ_t = f((t+1)/T) / f(0)
        assert ac[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert c.max() == pytest.approx(0.999)


def test_bad_names_and_betas_raise_clear_errors():
    with pytest.raises(ValueError, match=r"Unknown beta schedule 'cosin'.*'cosine'.*'linear'"):
        get_beta_schedule("cosin")
    with pytest.raises(ValueError, match="beta_start <= beta_end"):
        get_beta_schedule("linear", beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="num_timesteps"):
        get_beta_schedule("linear", num_timesteps=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule.from_betas(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Schedule.from_betas(np.array([0.1, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        Schedule.from_betas(np.ones((2, 3)) * 0.1)
