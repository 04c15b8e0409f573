"""The importance sampler of t (`diffusion.training.t_sampler`, Improved DDPM Sec. 3.3).

Truth: (1) a NumPy port of Improved DDPM's ``LossSecondMomentResampler`` / ``ScheduleSampler.sample``
(shift-and-append history, written from their published description independently of our ring
buffer) for the probabilities and weights; (2) on a fixed model, the weighted loss under the
importance draw has the same expectation as the uniform draw and as the exact mean over every t
(the unbiasedness the weights 1/(T p_t) are for), with a smaller variance; (3) a real run with it
resumes bitwise and records every term it saw.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import losses, schedules
from diffusion.training import t_sampler


class ReferenceResampler:
    """Improved DDPM's LossSecondMomentResampler (resample.py), in float64 NumPy."""

    def __init__(self, T, history_per_term=10, uniform_prob=0.001):
        self.T, self.H, self.u = T, history_per_term, uniform_prob
        self.history = np.zeros((T, history_per_term))
        self.counts = np.zeros(T, int)

    def weights(self):
        if not (self.counts == self.H).all():
            return np.ones(self.T)
        w = np.sqrt(np.mean(self.history**2, axis=-1))
        w = w / np.sum(w)
        w = w * (1 - self.u)
        return w + self.u / len(w)

    def probabilities(self):
        w = self.weights()
        return w / np.sum(w)

    def update_with_all_losses(self, ts, losses_):
        for t, loss in zip(ts, losses_):
            if self.counts[t] == self.H:  # shift out the oldest term
                self.history[t, :-1] = self.history[t, 1:]
                self.history[t, -1] = loss
            else:
                self.history[t, self.counts[t]] = loss
                self.counts[t] += 1


def test_probabilities_and_weights_match_improved_ddpms_resampler():
    T, H, u, B = 7, 3, 0.01, 5
    rng = np.random.default_rng(0)
    ref = ReferenceResampler(T, H, u)
    state = t_sampler.init_state("importance", T, H)
    update = jax.jit(t_sampler.update)
    seen_warm = False
    for _ in range(25):
        ts = rng.integers(0, T, B)
        ts[1] = ts[0]  # a repeated t inside one batch: applied in batch order
        vals = rng.gamma(2.0, 1.0 + ts, B)  # term sizes that differ by t
        ref.update_with_all_losses(ts, vals)
        state = update(state, jnp.asarray(ts, jnp.int32), jnp.asarray(vals, jnp.float32))
        p = np.asarray(t_sampler.probabilities(state, u))
        np.testing.assert_allclose(p, ref.probabilities(), rtol=2e-6, atol=1e-7)
        seen_warm |= (ref.counts == H).all()
        # The kept values are the H most recent of each t (order inside a row may differ).
        np.testing.assert_allclose(
            np.sort(np.asarray(state["history"]), 1), np.sort(ref.history, 1), rtol=1e-6
        )
    assert seen_warm and not np.allclose(ref.probabilities(), 1 / T)  # the test left warm-up
    t, w = t_sampler.draw(jax.random.key(1), state, 4096, T, u)
    p_ref = ref.probabilities()
    np.testing.assert_allclose(np.asarray(w), 1.0 / (T * p_ref[np.asarray(t)]), rtol=1e-5)
    freq = np.bincount(np.asarray(t), minlength=T) / 4096
    np.testing.assert_allclose(freq, p_ref, atol=4 * np.sqrt(p_ref.max() / 4096))


def test_uniform_draw_is_the_old_randint_and_a_non_finite_term_is_not_recorded():
    key = jax.random.key(3)
    t, w = t_sampler.draw(key, None, 16, 1000, 0.001)
    assert w is None and t_sampler.init_state("uniform", 1000) is None
    np.testing.assert_array_equal(t, jax.random.randint(key, (16,), 0, 1000, dtype=jnp.int32))
    s = t_sampler.init_state("importance", 4, 2)
    s = t_sampler.update(s, jnp.array([1, 1, 2]), jnp.array([jnp.nan, 2.0, jnp.inf]))
    np.testing.assert_array_equal(s["count"], [0, 1, 0, 0])
    np.testing.assert_array_equal(s["history"][1], [2.0, 0.0])
    with pytest.raises(ValueError, match="unknown t_sampler 'stratified'"):
        t_sampler.init_state("stratified", 4)


def _fixed_model_terms(T=40, n_noise=512, seed=0):
    """Every bound term L_t (bits/dim) of a fixed ε-model on 4x4 'images', for every t and
    ``n_noise`` noise draws: ``[T, n_noise]``. The model is the exact E[ε|x_t] of Gaussian data
    scaled by 0.8 (so every term is > 0 and they differ by orders of magnitude across t)."""
    sched = schedules.make_schedule(
        "linear", beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T, num_timesteps=T
    )
    abar = jnp.asarray(np.cumprod(1 - np.asarray(sched.betas, np.float64)), jnp.float32)
    m, s = 0.1, 0.3
    key = jax.random.key(seed)

    def denoise_fn(x_t, t):
        a = abar[t][:, None, None, None]
        return 0.8 * jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * m) / (a * s * s + 1 - a)

    x0 = jnp.clip(m + s * jax.random.normal(jax.random.fold_in(key, 1), (n_noise, 4, 4, 1)), -1, 1)

    def terms_at(t):
        noise = jax.random.normal(jax.random.fold_in(key, 100 + t), x0.shape)
        tb = jnp.full((n_noise,), t, jnp.int32)
        out, _ = losses.training_losses(
            sched, denoise_fn, x0, tb, noise, mean_type="eps", var_type="fixedlarge", loss_type="kl"
        )
        return out

    return np.asarray(jax.lax.map(terms_at, jnp.arange(T))), T


def test_importance_estimate_is_unbiased_and_matches_uniform_on_a_fixed_model():
    terms, T = _fixed_model_terms()
    n_noise = terms.shape[1]
    exact = terms.mean()  # E_t E_eps[L_t] over every t (the objective both draws estimate)
    exact_se = terms.mean(0).std(ddof=1) / np.sqrt(n_noise)
    # The history as training would fill it: 10 terms of each t.
    state = t_sampler.init_state("importance", T, 10)
    for j in range(10):
        state = t_sampler.update(state, jnp.arange(T), jnp.asarray(terms[:, j]))
    p = np.asarray(t_sampler.probabilities(state, 0.001))
    assert p.max() / p.min() > 10  # the draw really is far from uniform
    N = 40_000
    rng = np.random.default_rng(1)
    col = rng.integers(10, n_noise, N)  # fresh noise draws (not the ones in the history)
    t_u, _ = t_sampler.draw(jax.random.key(2), None, N, T, 0.001)
    t_i, w_i = t_sampler.draw(jax.random.key(2), state, N, T, 0.001)
    est_u = terms[np.asarray(t_u), col]
    est_i = np.asarray(w_i) * terms[np.asarray(t_i), col]
    for est in (est_u, est_i):
        se = est.std(ddof=1) / np.sqrt(N)
        z = (est.mean() - exact) / np.hypot(se, exact_se)
        assert abs(z) < 4, (est.mean(), exact, se)
    z_ui = (est_u.mean() - est_i.mean()) / np.hypot(
        est_u.std() / np.sqrt(N), est_i.std() / np.sqrt(N)
    )
    assert abs(z_ui) < 4
    # The exact expectation of the importance estimate, sum_t p_t w_t E[L_t], is the mean.
    np.testing.assert_allclose(np.sum(p * (1 / (T * p)) * terms.mean(1)), exact, rtol=1e-5)
    # And it is what the option is for: a smaller variance than the uniform draw.
    print(f"per-example std: uniform {est_u.std():.4f}, importance {est_i.std():.4f}")
    assert est_i.std() < 0.5 * est_u.std()


@pytest.mark.slow
def test_a_run_with_importance_sampling_records_every_term_and_resumes_bitwise(
    tiny_config, tmp_path
):
    from diffusion import factories, training
    from diffusion.checkpoint import Checkpointer, abstract_like
    from diffusion.factories import create_model

    c = tiny_config
    c.diffusion.loss_type = "kl"
    c.diffusion.num_timesteps = 12  # 12 x 2 terms: warm after a few steps of batch 8
    c.sample.num_steps = c.training.grid_sample.num_steps = 0
    c.training.t_sampler = "importance"
    c.training.t_sampler_history = 2
    straight = training.train(c, str(tmp_path / "straight"))
    c5 = c.copy_and_resolve_references()
    c5.training.num_train_steps = 5
    training.train(c5, str(tmp_path / "resumed"))
    resumed = training.train(c, str(tmp_path / "resumed"))  # 5 -> 10 from the checkpoint
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    counts = np.asarray(straight.t_sampler["count"])
    assert counts.sum() == 10 * c.training.batch_size and (counts >= 2).all()
    hist = np.asarray(straight.t_sampler["history"])
    assert np.isfinite(hist).all() and (hist > 0).all()  # KL terms and decoder NLL are > 0
    # The saved checkpoint holds the history (so the resume above drew the same t).
    model = create_model(c)
    ck = Checkpointer(str(tmp_path / "straight" / "checkpoints"))
    abstract = factories.abstract_state(c, model)
    saved, _, step = ck.restore_latest(abstract_like(abstract))
    ck.close()
    assert step == 10
    np.testing.assert_array_equal(saved.t_sampler["history"], hist)
    with open(tmp_path / "straight" / "metrics.jsonl") as f:
        logged = [json.loads(line)["loss"] for line in f]
    assert len(logged) == 10 and np.isfinite(logged).all()
    assert os.path.isdir(tmp_path / "resumed" / "checkpoints" / "10")


def test_checkpoints_from_before_the_option_restore_and_a_switch_is_named(tmp_path):
    """A checkpoint written before ``t_sampler`` existed (the TrainState's four fields) restores
    into today's TrainState, a uniform run writes exactly that tree, evaluation reads its EMA
    whatever the sampler switch, and resuming it with the importance sampler is refused naming
    the switch."""
    from train_worker import small_config

    from diffusion import evaluate, factories
    from diffusion.checkpoint import Checkpointer
    from diffusion.config_check import incompatible_fields

    c = small_config("unused", 1)
    model = factories.create_model(c)
    state = factories.init_state(c, model, factories.make_optimizer(c))
    assert state.t_sampler is None
    old = {k: getattr(state, k) for k in ("step", "params", "ema_params", "opt_state")}
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(3, old, factories.config_to_dict(c))
    ck.save(4, state, factories.config_to_dict(c))
    ck.wait()
    assert jax.tree.structure(ck.saved_tree(3)) == jax.tree.structure(ck.saved_tree(4))
    got = Checkpointer(str(tmp_path / "ck")).restore(3, factories.abstract_state(c, model))[0]
    assert isinstance(got, factories.TrainState) and got.t_sampler is None
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c_is = small_config("unused", 1)
    c_is.training.t_sampler = "importance"
    ema = evaluate.restore_ema_params(ck, 3, c_is, model, None)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = factories.config_to_dict(c)
    del saved["training"]["t_sampler"]  # a config saved before the option: read as uniform
    assert incompatible_fields(saved, c) == []
    diffs = incompatible_fields(saved, c_is)
    assert len(diffs) == 1 and "training.t_sampler" in diffs[0] and "importance" in diffs[0]
    assert incompatible_fields(saved, c_is, optimizer=False) == []
