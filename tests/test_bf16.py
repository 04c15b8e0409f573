"""bfloat16 compute (``config.model.dtype='bfloat16'``) keeps the training loss and its gradients
close to float32's.

Same parameters (float32 in both cases: only the compute dtype changes), same tiny batch, same
t, noise and dropout key; the loss is the real training loss (`diffusion.losses.training_losses`
with the config's eps / fixedlarge / mse). One compile per dtype.

The parameters are not the model's initialisation: DDPM zero-initialises the last conv of every
block and the output head (scale 1e-10), so at init the output is ~0 and the loss is ≈ mean(ε²)
whatever the precision. Every kernel is redrawn as N(0, 1/fan_in) and norms/biases perturbed, so
that every layer contributes to the output and the gradients.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import factories, losses
from experiments import tiny

BATCH = 4
# Measured on CPU (jax 0.10.2, 2 cores): |loss_bf16 − loss_fp32| / loss_fp32 = 4.2e-4
# (loss_fp32 1.3510, loss_bf16 1.3504); gradient cosine similarity 0.99997.
# Tolerance ≈ 5× the measured relative difference.
LOSS_RTOL = 2e-3
MIN_GRAD_COSINE = 0.99


def _params_like(abstract, seed=0):
    """Non-degenerate float32 parameters with the tree structure of ``abstract``."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if name.endswith("['kernel']"):
            return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        if name.endswith("['scale']"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _loss_and_grads(config, params, x0, t, noise, dropout_key):
    """(loss, grads, lowered StableHLO text) of the mean training loss under ``config``."""
    model = factories.create_model(config)
    schedule = factories.schedule_from_config(config)
    d = config.diffusion

    def loss_fn(p):
        def denoise_fn(x_t, t_):
            return model.apply({"params": p}, x_t, t_, train=True, rngs={"dropout": dropout_key})

        per_ex, _ = losses.training_losses(
            schedule,
            denoise_fn,
            x0,
            t,
            noise,
            mean_type=d.mean_type,
            var_type=d.var_type,
            loss_type=d.loss_type,
        )
        return per_ex.mean()

    lowered = jax.jit(jax.value_and_grad(loss_fn)).lower(params)
    loss, grads = lowered.compile()(params)
    return float(loss), grads, lowered.as_text()


def _flat(tree):
    return np.concatenate(
        [np.asarray(g, np.float64).ravel() for g in jax.tree_util.tree_leaves(tree)]
    )


@pytest.mark.slow
def test_bf16_loss_and_gradients_match_fp32():
    config = tiny.get_config()
    assert config.model.dtype == "float32"
    config16 = copy.deepcopy(config)
    config16.model.dtype = "bfloat16"

    size, c = config.data.image_size, config.data.channels
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(np.round(rng.uniform(0, 255, (BATCH, size, size, c))) / 127.5 - 1, jnp.float32)
    noise = jnp.asarray(rng.standard_normal((BATCH, size, size, c)), jnp.float32)
    t = jnp.array([3, 30, 60, config.diffusion.num_timesteps - 3], jnp.int32)
    dropout_key = jax.random.key(2)

    model = factories.create_model(config)
    abstract = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, x0[:1], t[:1], train=False)
    )["params"]
    params = _params_like(abstract)

    loss32, g32, hlo32 = _loss_and_grads(config, params, x0, t, noise, dropout_key)
    loss16, g16, hlo16 = _loss_and_grads(config16, params, x0, t, noise, dropout_key)

    # The bf16 program really computes in bf16 (and the fp32 one does not).
    assert "bf16" in hlo16 and "bf16" not in hlo32
    assert np.isfinite(loss32) and np.isfinite(loss16)
    assert loss32 > 1.2, f"degenerate parameters: loss {loss32} ≈ mean(ε²)"
    assert loss16 != loss32, "bf16 loss identical to fp32: bf16 compute not in effect?"
    rel = abs(loss16 - loss32) / abs(loss32)
    assert rel < LOSS_RTOL, f"bf16 loss {loss16} vs fp32 {loss32}: relative difference {rel:.2e}"

    v32, v16 = _flat(g32), _flat(g16)
    assert np.all(np.isfinite(v16))
    cos = float(v32 @ v16 / (np.linalg.norm(v32) * np.linalg.norm(v16)))
    assert cos > MIN_GRAD_COSINE, f"gradient cosine similarity bf16 vs fp32 = {cos:.5f}"
