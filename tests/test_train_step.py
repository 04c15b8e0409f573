"""What the compiled train step really does, checked on real steps against independent truth:
the EMA recurrence, the timestep distribution, dropout on in training and off when sampling,
and the released code's per-group gradient clipping."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion import factories, training
from experiments import tiny


def _config(**training):
    c = tiny.get_config()
    c.data.image_size = 8
    c.model.ch_mult = (1,)
    c.model.attn_resolutions = ()
    c.training.batch_size = 4
    for k, v in training.items():
        setattr(c.training, k, v)
    return c


def _batch(c, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(
        -1, 1, (c.training.batch_size, c.data.image_size, c.data.image_size, c.data.channels)
    )
    return {"image": jnp.asarray(x, jnp.float32)}


@pytest.mark.slow
def test_ema_follows_the_recurrence_of_the_parameters_actually_produced():
    """ema_k = d·ema_{k−1} + (1−d)·θ_k with ema_0 = θ_0, computed in float64 from the parameters
    each real step returned. Swapping d and 1−d, or averaging the pre-update parameters, fails."""
    decay = 0.8
    c = _config(ema_decay=decay, lr=1e-2, warmup_steps=0)
    model, schedule, tx = (
        factories.create_model(c),
        factories.schedule_from_config(c),
        factories.make_optimizer(c),
    )
    step = training.make_train_step(c, model, schedule, tx)
    state = factories.init_state(c, model, tx)
    f64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)  # noqa: E731
    ema = f64(state.params)
    key = jax.random.key(0)
    for k in range(4):
        state, _ = step(state, _batch(c, k), key)
        params = f64(state.params)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
        got = f64(state.ema_params)
        for e, g, _p in zip(jax.tree.leaves(ema), jax.tree.leaves(got), jax.tree.leaves(params)):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    # The check has teeth: after 4 steps the EMA is far from the parameters themselves.
    moved = max(
        float(np.abs(g - p).max())
        for g, p in zip(jax.tree.leaves(f64(state.ema_params)), jax.tree.leaves(f64(state.params)))
    )
    assert moved > 1e-3


class _Record:
    """Host-side sink for `_Spy` (a plain object: Flax would freeze a list attribute)."""

    def __init__(self):
        self.items = []

    def append(self, item):
        self.items.append(item)


class _Spy(nn.Module):
    """A stand-in network that reports (t, train, whether a dropout key came) to the host."""

    out_ch: int
    record: _Record

    @nn.compact
    def __call__(self, x, t, train: bool):
        has_dropout = self.has_rng("dropout")
        jax.debug.callback(
            lambda tt, flag: self.record.append((np.asarray(tt), bool(flag))),
            t,
            jnp.asarray(train and has_dropout),
        )
        w = self.param("w", nn.initializers.ones, (1,))
        return jnp.zeros(x.shape[:-1] + (self.out_ch,)) + w * 0.0 + x[..., :1] * 0.0


@pytest.mark.slow
def test_timesteps_cover_exactly_0_to_T_minus_1_uniformly_and_train_mode_is_on():
    c = _config(batch_size=64)
    T = 10
    c.diffusion.num_timesteps = T
    record = _Record()
    model = _Spy(out_ch=c.data.channels, record=record)
    schedule, tx = factories.schedule_from_config(c), factories.make_optimizer(c)
    step = training.make_train_step(c, model, schedule, tx)
    state = factories.init_state(c, model, tx)
    jax.effects_barrier()
    record.items.clear()  # (the init call)
    key = jax.random.key(3)
    for _ in range(40):
        state, _ = step(state, _batch(c, 0), key)
    jax.effects_barrier()
    ts = np.concatenate([r[0] for r in record.items])
    assert len(ts) == 40 * 64 and all(r[1] for r in record.items)  # train=True with a dropout rng
    assert set(np.unique(ts)) == set(range(T))  # exactly {0, ..., T−1}
    counts = np.bincount(ts, minlength=T)
    expected = len(ts) / T
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, (counts, chi2)  # χ²(9) 99.9 % quantile: uniform over the T values
    # With T = 1000 the extremes are drawn too (0 and 999 are in range, 1000 never).
    draws = jax.random.randint(jax.random.key(0), (200_000,), 0, 1000)  # the step's own call
    assert int(draws.min()) == 0 and int(draws.max()) == 999


@pytest.mark.slow
def test_dropout_is_active_in_training_and_off_for_sampling():
    c = _config()
    c.model.dropout = 0.5
    model = factories.create_model(c)
    state = factories.init_state(c, model, factories.make_optimizer(c))
    # Random weights everywhere (the "zero" layers too), so that dropout's effect is not hidden.
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    state = state.replace(
        params=jax.tree.unflatten(
            treedef, [0.2 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
        )
    )
    x = _batch(c, 1)["image"]
    t = jnp.array([3, 50, 10, 99], jnp.int32)
    apply = lambda train_, key: model.apply(
        {"params": state.params},
        x,
        t,
        train=train_,  # noqa
        rngs={"dropout": key},
    )
    a, b = apply(True, jax.random.key(1)), apply(True, jax.random.key(2))
    assert float(jnp.abs(a - b).mean()) > 1e-2 * float(jnp.abs(a).mean())  # masks differ
    denoise = factories.make_denoise_fn(model, state.params)  # what samplers/eval use
    e1, e2 = denoise(x, t), apply(False, jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))  # deterministic, no dropout
    # And the sampler path really calls the network with train=False.
    record = _Record()
    spy = _Spy(out_ch=c.data.channels, record=record)
    p = spy.init(jax.random.key(0), x, t, train=False)["params"]
    jax.jit(factories.make_denoise_fn(spy, p))(x, t)
    jax.effects_barrier()
    assert record.items and not any(r[1] for r in record.items)


@pytest.mark.slow
def test_grad_clip_groups_clip_each_group_then_average_as_the_released_tpu_code():
    """groups=2: each half of the batch's gradient is clipped to grad_clip on its own, then the
    two are averaged (tf.tpu.CrossShardOptimizer + per-core clip_by_global_norm). Checked against
    gradients computed separately per half; groups=0 is the clip of the mean gradient."""
    clip = 1e-3  # small enough that every half's gradient is clipped
    c = _config(grad_clip=clip, grad_clip_groups=2, lr=1.0, warmup_steps=0, ema_decay=0.0)
    c.model.dropout = 0.0
    model, schedule = factories.create_model(c), factories.schedule_from_config(c)
    lr = 1000.0  # large, so that the update stands well above float32 rounding of the params
    tx_sgd = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr))  # update = −lr·grad
    state0 = factories.init_state(c, model, tx_sgd)
    batch, key = _batch(c, 7), jax.random.key(11)
    step = training.make_train_step(c, model, schedule, tx_sgd)
    new, metrics = step(jax.tree.map(jnp.copy, state0), batch, key)
    got = jax.tree.map(lambda new_, old: (old - new_) / lr, new.params, state0.params)  # grad

    # Independent: the same t/ε as the step draws, a gradient per half, clipped, averaged.
    from diffusion import gaussian, losses

    k = jax.random.fold_in(key, state0.step)
    t_key, noise_key, _ = jax.random.split(k, 3)
    x0 = batch["image"]
    t = jax.random.randint(t_key, (4,), 0, c.diffusion.num_timesteps, dtype=jnp.int32)
    noise = jax.random.normal(noise_key, x0.shape)

    def half_loss(params, sl):
        x_t = gaussian.q_sample(schedule, x0[sl], t[sl], noise[sl])
        out = model.apply({"params": params}, x_t, t[sl], train=False)
        per, _ = losses.loss_from_output(
            schedule,
            out,
            x0[sl],
            x_t,
            t[sl],
            noise[sl],
            mean_type="eps",
            var_type="fixedlarge",
            loss_type="mse",
        )
        return per.mean()

    halves = [jax.grad(half_loss)(state0.params, sl) for sl in (slice(0, 2), slice(2, 4))]
    clipped = [
        jax.tree.map(lambda g, n=optax.tree.norm(h): g * jnp.minimum(1.0, clip / n), h)
        for h in halves
    ]
    want = jax.tree.map(lambda a, b: (a + b) / 2, *clipped)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-9)
    assert all(float(optax.tree.norm(h)) > clip for h in halves)
    # The global mode differs: clip(mean) ≠ mean(clip) when the halves point different ways.
    c0 = _config(grad_clip=clip, grad_clip_groups=0, lr=1.0, warmup_steps=0, ema_decay=0.0)
    c0.model.dropout = 0.0
    new0, _ = training.make_train_step(c0, model, schedule, tx_sgd)(
        jax.tree.map(jnp.copy, state0), batch, key
    )
    diff = max(
        float(jnp.abs((s - a) / lr - b).max())
        for a, s, b in zip(
            jax.tree.leaves(new0.params), jax.tree.leaves(state0.params), jax.tree.leaves(got)
        )
    )
    assert diff > 1e-7
    assert np.isfinite(float(metrics["grad_norm"]))


def test_grad_clip_groups_must_divide_the_batch():
    from diffusion.config_check import config_problems

    c = _config(grad_clip_groups=3)
    assert any("grad_clip_groups=3 must divide" in p for p in config_problems(c))
    c = _config(resume="optimizer")
    assert any("config.training.resume='optimizer'" in p for p in config_problems(c))
