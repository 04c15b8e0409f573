"""The jit-compiled sharded train step of Algorithm 1 (`make_train_step`).

Randomness is stateless: the step's key is ``fold_in(base_key, step)``, so a resumed run draws
exactly what an uninterrupted one would. The model, schedule and optimizer come from
`diffusion.factories`; the loop that runs this step is `diffusion.training.loop`.
"""

from __future__ import annotations

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import optax

from diffusion import losses, parallel
from diffusion.factories import TrainState, learning_rate_fn, parameterization
from diffusion.schedules import Schedule
from diffusion.training import t_sampler as t_sampling

__all__ = ["make_train_step"]


def _quartile_means(per_example, t, num_timesteps):
    """Mean loss in each quarter of [0, T): ``[B], [B] -> [4]`` (nan for an empty quarter)."""
    q = jnp.clip((t * 4) // num_timesteps, 0, 3)
    onehot = jax.nn.one_hot(q, 4, dtype=per_example.dtype)
    sums = onehot.T @ per_example
    counts = onehot.sum(0)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)


def make_train_step(config, model, schedule: Schedule, tx, mesh=None) -> Callable:
    """The compiled step ``(state, batch, base_key) -> (state, metrics)`` (Algorithm 1).

    ``batch['image']`` ``[B, H, W, C]`` in [−1, 1], sharded over 'data'; ``state`` is donated.
    Per step: key = fold_in(base_key, step) → t ~ U{0..T−1} (or, with
    ``training.t_sampler='importance'``, t ~ p_t with weights 1/(T p_t): `t_sampler`), ε ~ N(0, I),
    dropout key; loss (the weighted mean of the per-example terms, an unbiased estimate of the
    objective either way) and gradients; clip + Adam; EMA of the parameters; the importance
    sampler's history gets the batch's terms. Metrics: loss, loss per t-quartile (unweighted),
    grad norm (before clipping), lr, and ``finite`` (1 if loss and gradients are finite). With
    ``training.nonfinite='skip'`` a non-finite step leaves the state unchanged except ``step``.
    """
    tr = config.training
    T = config.diffusion.num_timesteps
    lr_fn = learning_rate_fn(config)
    skip_nonfinite = tr.nonfinite == "skip"
    groups = tr.grad_clip_groups if tr.grad_clip > 0 else 0
    param = parameterization(config)  # validated once
    _, _, uniform_prob = t_sampling.sampler_options(config)

    def step_fn(state: TrainState, batch: Dict[str, jnp.ndarray], base_key):
        x0 = batch["image"]
        key = jax.random.fold_in(base_key, state.step)
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        B = x0.shape[0]
        t, weights = t_sampling.draw(t_key, state.t_sampler, B, T, uniform_prob)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        if weights is None:  # uniform: every weight 1 (the mean is the plain mean, bitwise)
            weights = jnp.ones((B,), jnp.float32)
            weighted = False
        else:
            weighted = True

        def loss_fn(params, x0, x_t_noise, t, w, dropout_key):
            def denoise_fn(x_t, t):  # the network in training mode (dropout on)
                return model.apply(
                    {"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key}
                ).astype(jnp.float32)

            per_ex, _ = losses.training_losses(
                schedule, denoise_fn, x0, t, x_t_noise, **param.loss_kwargs
            )
            return ((w * per_ex).mean() if weighted else per_ex.mean()), per_ex

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if groups <= 1:
            (loss, per_ex), grads = grad_fn(state.params, x0, noise, t, weights, dropout_key)
            grad_norm = optax.tree.norm(grads)
        else:
            # The released TPU code: each core clips the gradient of its own share of the batch
            # to grad_clip, then the clipped gradients are averaged (the optimizer's global clip
            # that follows is then a no-op: a mean of vectors of norm <= c has norm <= c).
            split = lambda a: a.reshape((groups, B // groups) + a.shape[1:])  # noqa: E731
            keys = jax.random.split(dropout_key, groups)
            (losses_g, per_ex_g), grads_g = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0, 0, 0))(
                state.params, split(x0), split(noise), split(t), split(weights), keys
            )
            loss, per_ex = losses_g.mean(), per_ex_g.reshape(B)
            grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.mean(0), grads_g))
            norms = jax.vmap(optax.tree.norm)(grads_g)
            scale = jnp.minimum(1.0, tr.grad_clip / jnp.maximum(norms, 1e-30))
            grads = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1) / groups, grads_g)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = tr.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(
            step=state.step + 1,
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            t_sampler=t_sampling.update(state.t_sampler, t, per_ex),
        )
        if skip_nonfinite:
            new = jax.tree.map(
                lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1)
            )
        q = _quartile_means(per_ex, t, T)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_fn(state.step),
            "finite": finite.astype(jnp.float32),
            **{f"loss_q{i}": q[i] for i in range(4)},
        }
        return new, metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=(0,))
    rep, data = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    return jax.jit(
        step_fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=(0,)
    )
