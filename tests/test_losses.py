"""Training losses and variational-bound terms against closed forms and gradient structure."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import gaussian as G
from diffusion import losses as L
from diffusion.schedules import make_schedule

SCHED = make_schedule("linear")
SHAPE = (4, 4, 4, 3)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(np.round(rng.uniform(0, 255, SHAPE)) / 127.5 - 1, jnp.float32)
    eps = jnp.asarray(rng.standard_normal(SHAPE), jnp.float32)
    t = jnp.array([0, 1, 400, 999])
    return x0, eps, t, G.q_sample(SCHED, x0, t, eps)


def test_prior_bpd_closed_form_about_1e5():
    x0, *_ = _batch()
    ac = np.prod(1 - np.linspace(1e-4, 0.02, 1000))
    x = np.asarray(x0, np.float64).reshape(4, -1)
    # KL(N(√ᾱ x, 1−ᾱ) ‖ N(0,1)) = ½(−log(1−ᾱ) − ᾱ + ᾱx²) per dimension, in nats.
    want = (0.5 * (-np.log1p(-ac) - ac + ac * x**2)).mean(axis=1) / math.log(2)
    got = np.asarray(L.prior_bpd(SCHED, x0))
    np.testing.assert_allclose(got, want, rtol=2e-2)
    assert 1e-6 < got.mean() < 3e-5


def test_vb_term_zero_for_true_posterior_and_positive_otherwise():
    x0, eps, t, xt = _batch()
    true_mean = G.q_posterior_mean_variance(SCHED, x0, xt, t)[0]
    vb, _ = L.vb_terms_bpd(SCHED, true_mean, x0, xt, t, mean_type="xprev", var_type="fixedsmall")
    np.testing.assert_allclose(vb[1:], 0.0, atol=1e-4)  # KL of identical Gaussians
    vb_bad, _ = L.vb_terms_bpd(
        SCHED, true_mean + 0.1, x0, xt, t, mean_type="xprev", var_type="fixedsmall"
    )
    assert (vb_bad[1:] > vb[1:] + 1e-3).all()
    # KL with a mean error d and equal variances is d²/(2σ²) nats per dim.
    bt = float(SCHED.posterior_variance[400])
    assert float(vb_bad[2]) == pytest.approx(0.01 / (2 * bt) / math.log(2), rel=1e-3)


def test_decoder_term_at_t0_matches_exact_gaussian_bin_probability():
    x0, eps, t, xt = _batch()
    # With a sharp decoder centred on x0 the NLL → 0; with σ = 1/255 it is −log2 P(bin), P computed
    # with the exact erf (independent of the tanh approximation, which agrees to ~1e-3).
    sharp = jnp.concatenate([x0, jnp.full(SHAPE, 2 * math.log(1e-4))], axis=-1)
    vb, _ = L.vb_terms_bpd(SCHED, sharp, x0, xt, t, mean_type="xprev", var_type="learned")
    assert float(vb[0]) < 1e-4
    sigma = 1 / 255
    ls = jnp.concatenate([x0, jnp.full(SHAPE, 2 * math.log(sigma))], axis=-1)
    vb, _ = L.vb_terms_bpd(SCHED, ls, x0, xt, t, mean_type="xprev", var_type="learned")
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    x = np.asarray(x0[0]).ravel()
    p_inner = phi(1.0) - phi(-1.0)
    per_px = np.where(np.abs(x) > 0.999, -np.log2(phi(1.0)), -np.log2(p_inner))
    assert float(vb[0]) == pytest.approx(per_px.mean(), rel=5e-3)


@pytest.mark.parametrize("mean_type", G.MEAN_TYPES)
def test_mse_is_zero_for_the_true_target(mean_type):
    x0, eps, t, xt = _batch()
    target = {
        "eps": eps,
        "xstart": x0,
        "xprev": G.q_posterior_mean_variance(SCHED, x0, xt, t)[0],
        "v": G.predict_v(SCHED, x0, t, eps),
    }[mean_type]
    loss, _ = L.loss_from_output(
        SCHED, target, x0, xt, t, eps, mean_type=mean_type, var_type="fixedlarge", loss_type="mse"
    )
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    loss, _ = L.loss_from_output(
        SCHED,
        target + 0.5,
        x0,
        xt,
        t,
        eps,
        mean_type=mean_type,
        var_type="fixedlarge",
        loss_type="mse",
    )
    np.testing.assert_allclose(loss, 0.25, rtol=1e-5)


@pytest.mark.slow
def test_hybrid_gradients_split_between_mean_and_variance():
    x0, eps, t, xt = _batch()
    out = (
        jnp.asarray(np.random.default_rng(9).standard_normal(SHAPE[:-1] + (6,)), jnp.float32) * 0.3
    )

    def total(o, loss_type, **kw):
        return L.loss_from_output(
            SCHED,
            o,
            x0,
            xt,
            t,
            eps,
            mean_type="eps",
            var_type="learned_range",
            loss_type=loss_type,
            **kw,
        )[0].sum()

    g_h = jax.grad(total)(out, "hybrid")
    g_kl = jax.grad(total)(out, "kl")
    mse_grad = -2 * (eps - out[..., :3]) / np.prod(SHAPE[1:])
    np.testing.assert_allclose(
        g_h[..., :3], mse_grad, rtol=1e-4, atol=1e-7
    )  # vb adds nothing to mean
    np.testing.assert_allclose(g_h[..., 3:], 0.001 * 1000 * g_kl[..., 3:], rtol=1e-4, atol=1e-8)
    assert float(jnp.abs(g_h[..., 3:]).max()) > 0


def test_training_losses_calls_network_on_q_sample():
    x0, eps, t, xt = _batch()
    seen = {}

    def denoise_fn(x, tt):
        seen["x"], seen["t"] = x, tt
        return eps

    loss, aux = L.training_losses(
        SCHED, denoise_fn, x0, t, eps, mean_type="eps", var_type="fixedlarge", loss_type="mse"
    )
    np.testing.assert_allclose(seen["x"], xt)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    kl, _ = jax.jit(
        lambda x0, t, e: L.training_losses(
            SCHED, lambda x, tt: e, x0, t, e, mean_type="eps", var_type="fixedsmall", loss_type="kl"
        )
    )(x0, t, eps)
    assert kl.shape == (4,) and kl.dtype == jnp.float32 and bool(jnp.isfinite(kl).all())


def test_invalid_combinations_raise_with_reasons():
    with pytest.raises(ValueError, match="never learn.*hybrid"):
        L.check_loss_config("eps", "learned", "mse")
    with pytest.raises(ValueError, match="just 'mse'"):
        L.check_loss_config("eps", "fixedlarge", "hybrid")
    with pytest.raises(ValueError, match=r"Unknown loss_type 'l2'.*'mse'"):
        L.check_loss_config("eps", "fixedlarge", "l2")
    for mt in G.MEAN_TYPES:
        for vt in G.VAR_TYPES:
            L.check_loss_config(mt, vt, "kl")
