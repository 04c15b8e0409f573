"""Everything built from a config before a run starts: the model, the schedule, the
parameterization, the optimizer, the initial `TrainState` and the network as a ``denoise_fn``.

This module sits below the training loop, the evaluation and the tools (`train`, `evaluate`,
`convert`, `experiments.reproduce`): they all build the same objects the same way from here, and
it imports nothing above it.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from diffusion import parallel, rng
from diffusion.checkpoint import abstract_like
from diffusion.parameterization import Parameterization
from diffusion.schedules import Schedule, make_schedule

__all__ = [
    "TrainState",
    "create_model",
    "schedule_from_config",
    "parameterization",
    "learning_rate_fn",
    "make_optimizer",
    "init_state",
    "abstract_state",
    "make_denoise_fn",
    "config_to_dict",
]


# ----------------------------------------------------------------------------- model, process
def parameterization(config) -> Parameterization:
    """The validated (mean, var, loss) spec of ``config.diffusion``."""
    return Parameterization.from_config(config.diffusion)


def create_model(config):
    """The registered network of ``config.model`` with ``out_ch`` set by the variance type
    (C, or 2C for learned Σ) and the compute choices of ``config.runtime`` (absent: defaults)."""
    from diffusion.models import get_model

    out_ch = parameterization(config).output_channels(config.data.channels)
    return get_model(config.model, out_ch=out_ch, runtime=config.get("runtime"))


def schedule_from_config(config) -> Schedule:
    """`Schedule` of ``config.diffusion`` (float64 betas cast to float32)."""
    d = config.diffusion
    return make_schedule(
        d.beta_schedule, beta_start=d.beta_start, beta_end=d.beta_end, num_timesteps=d.num_timesteps
    )


def make_denoise_fn(model, params) -> Callable:
    """``denoise_fn(x_t [B,H,W,C], t int32 [B]) -> [B,H,W,C or 2C]`` float32: the network in eval
    mode, the form every sampler and the bound take."""

    def denoise_fn(x_t, t):
        return model.apply({"params": params}, x_t, t, train=False).astype(jnp.float32)

    return denoise_fn


# ----------------------------------------------------------------------------- optimizer
def learning_rate_fn(config) -> Callable:
    """lr · min(step / warmup_steps, 1): the released code's linear warm-up, then constant."""
    lr, warmup = config.training.lr, config.training.warmup_steps

    def schedule(step):
        if warmup <= 0:
            return jnp.asarray(lr, jnp.float32)
        return lr * jnp.minimum(jnp.asarray(step, jnp.float32) / warmup, 1.0)

    return schedule


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping then Adam (eps 1e-8, no weight decay by default) with warm-up."""
    t = config.training
    parts = []
    if t.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(t.grad_clip))
    parts.append(optax.scale_by_adam(b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps))
    if t.weight_decay > 0:
        parts.append(optax.add_decayed_weights(t.weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate_fn(config)))
    return optax.chain(*parts)


# ----------------------------------------------------------------------------- state
class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue: a pytree saved whole by Orbax."""

    step: jnp.ndarray  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    # The timestep sampler's state (`diffusion.training.t_sampler`): None for the uniform draw
    # (no leaves, so the checkpoint tree is what it was before the option existed).
    t_sampler: Any = None


def init_state(config, model, tx, mesh=None) -> TrainState:
    """Initial `TrainState` (params from the `rng.PARAM_INIT` stream), replicated on ``mesh``."""
    from diffusion.training import t_sampler

    size, c = config.data.image_size, config.data.channels
    kind, history, _ = t_sampler.sampler_options(config)

    def init():
        key = rng.stream(config.seed, rng.PARAM_INIT)
        x = jnp.zeros((1, size, size, c), jnp.float32)
        params = model.init({"params": key}, x, jnp.zeros((1,), jnp.int32), train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            t_sampler=t_sampler.init_state(kind, config.diffusion.num_timesteps, history),
        )

    out_shardings = parallel.replicated_sharding(mesh) if mesh is not None else None
    return jax.jit(init, out_shardings=out_shardings)()


def abstract_state(config, model, mesh=None) -> TrainState:
    """The `TrainState` of ``config`` as ``jax.ShapeDtypeStruct`` leaves (no arrays allocated),
    replicated on ``mesh`` when given: the target a checkpoint restores into."""
    tx = make_optimizer(config)
    abstract = jax.eval_shape(lambda: init_state(config, model, tx))
    return (
        abstract_like(abstract, parallel.replicated_sharding(mesh))
        if mesh is not None
        else abstract
    )


def config_to_dict(config) -> dict:
    """A config as a plain JSON-able dict (tuples become lists), as saved with checkpoints."""
    return (
        json.loads(config.to_json_best_effort())
        if hasattr(config, "to_json_best_effort")
        else dict(config)
    )
