"""`diffusion.models.group_norm`: the column-sum GroupNorm against a float64 NumPy GroupNorm
(Wu & He 2018, Eq. 1-2 written out directly), against ``flax.linen.GroupNorm`` (a second
implementation: values and the parameter tree; under differentiation it is flax's program), its
gradients against autodiff of the float64 definition, and on inputs whose mean dwarfs their
spread (where the one-pass variance E[x^2] - mean^2 loses its digits)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models import group_norm as group_norm_module
from diffusion.models.group_norm import GroupNorm, group_norm


def np_group_norm64(x, scale, bias, groups, eps):
    """GroupNorm in float64, straight from the definition: statistics per (sample, group)."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    xn = ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return xn * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def _inputs(shape, seed, loc=0.0, spread=1.0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    # per-channel offsets so that groups really differ, plus noise
    x = loc + rng.normal(0.0, 2.0, (1, 1, 1, c)) + spread * rng.standard_normal(shape)
    scale = 1.0 + 0.3 * rng.standard_normal(c)
    bias = 0.5 * rng.standard_normal(c)
    return (jnp.asarray(v, jnp.float32) for v in (x, scale, bias))


@pytest.mark.parametrize(
    "shape,groups", [((2, 8, 8, 64), 32), ((3, 4, 6, 96), 32), ((2, 5, 5, 8), 4)]
)
def test_matches_float64_definition(shape, groups):
    x, scale, bias = _inputs(shape, seed=sum(shape))
    got = np.asarray(jax.jit(group_norm, static_argnums=(3, 4))(x, scale, bias, groups, 1e-6))
    want = np_group_norm64(x, scale, bias, groups, 1e-6)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_two_pass_variance_keeps_precision_on_a_large_mean():
    # mean 1000, spread 0.01: var ~1e-4 while E[x^2] ~1e6; a one-pass fp32 variance
    # (E[x^2] - mean^2) has an error of ~1e6 * 6e-8 = 0.06 >> 1e-4 and is useless here.
    x, scale, bias = _inputs((2, 8, 8, 64), seed=3, loc=1000.0, spread=0.01)
    x = x - jnp.mean(x, axis=(1, 2), keepdims=True) + 1000.0  # every channel at mean 1000
    got = np.asarray(group_norm(x, scale, bias, 32, 1e-6))
    want = np_group_norm64(x, scale, bias, 32, 1e-6)
    # the fp32 input quantisation (ulp(1000) = 6e-5 against a spread of 0.01) bounds the accuracy
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
    fast = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=True)
    got_fast = np.asarray(fast.apply({"params": {"scale": scale, "bias": bias}}, x))
    assert np.abs(got_fast - want).max() > 10 * np.abs(got - want).max()


def test_same_parameters_and_values_as_flax_groupnorm_and_float64_gradients():
    x, scale, bias = _inputs((2, 8, 8, 64), seed=7)
    ours = GroupNorm(num_groups=32, epsilon=1e-6)
    ref = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
    p_ours = ours.init(jax.random.key(0), x)
    p_ref = ref.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), p_ours) == jax.tree.map(
        lambda a: (a.shape, a.dtype), p_ref
    )
    np.testing.assert_array_equal(p_ours["params"]["scale"], p_ref["params"]["scale"])
    np.testing.assert_array_equal(p_ours["params"]["bias"], p_ref["params"]["bias"])
    params = {"params": {"scale": scale, "bias": bias}}
    g = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)

    def loss(mod, p, x):
        return jnp.sum(jax.nn.swish(mod.apply(p, x)) * g)

    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=0, atol=1e-5)
    # Under differentiation the module runs the C++ forward where it is built (CPU, float32;
    # statistics accumulated in float64), else flax's formulation value for value.
    y_diff, _ = jax.vjp(lambda x: ours.apply(params, x), x)
    if group_norm_module._kernel_ok(x, scale, scale, jnp.float32):
        np.testing.assert_allclose(y_diff, ref.apply(params, x), rtol=0, atol=2e-6)
    else:
        np.testing.assert_array_equal(y_diff, ref.apply(params, x))
    # Gradients (through swish) against autodiff of the float64 definition.
    go = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
    with jax.enable_x64(True):

        def loss64(scale, bias, x):
            b, h, w, c = x.shape
            xg = x.reshape(b, h, w, 32, c // 32)
            mean = xg.mean(axis=(1, 2, 4), keepdims=True)
            var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
            y = ((xg - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
            return jnp.sum(jax.nn.swish(y) * jnp.asarray(g, jnp.float64))

        as64 = [jnp.asarray(np.asarray(v), jnp.float64) for v in (scale, bias, x)]
        ds, db, dx = (np.asarray(v) for v in jax.grad(loss64, argnums=(0, 1, 2))(*as64))
    got = {"scale": go[0]["params"]["scale"], "bias": go[0]["params"]["bias"], "x": go[1]}
    for name, want in (("scale", ds), ("bias", db), ("x", dx)):
        np.testing.assert_allclose(
            got[name], want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=name
        )


def test_bfloat16_compute_keeps_float32_statistics():
    x, scale, bias = _inputs((2, 4, 4, 64), seed=11)
    mod = GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.bfloat16)
    params = {"params": {"scale": scale, "bias": bias}}
    y = mod.apply(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    want = np_group_norm64(x.astype(jnp.bfloat16).astype(jnp.float32), scale, bias, 32, 1e-6)
    # only the final rounding to bf16 (8 bits of mantissa) separates it from the float64 result
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2**-7, atol=1e-2)


def test_channels_not_divisible_by_groups_is_a_clear_error():
    x = jnp.zeros((1, 2, 2, 48))
    with pytest.raises(ValueError, match="48 channels are not divisible by 32 groups"):
        group_norm(x, jnp.ones(48), jnp.zeros(48), 32, 1e-6)


@pytest.mark.parametrize(
    "shape, groups", [((2, 16, 16, 128), 32), ((3, 5, 7, 96), 32), ((1, 4, 4, 8), 2)]
)
def test_cpu_kernel_forward_and_gradients_match_flax_autodiff(shape, groups):
    """The C++ GroupNorm (forward + closed-form backward) against JAX's autodiff of flax's
    GroupNorm: output, input gradient and both parameter gradients within 1e-5 relative."""
    x, scale, bias = _inputs(shape, seed=11)
    if not group_norm_module._kernel_ok(x, scale, bias, jnp.float32):
        pytest.skip("the C++ kernels are not built here (no compiler) or not on CPU")
    g = jnp.asarray(np.random.default_rng(12).standard_normal(shape), jnp.float32)

    def run(fn):
        y, vjp = jax.vjp(fn, x, scale, bias)
        return (y,) + vjp(g)

    ours = jax.jit(lambda: run(lambda x, s, b: group_norm(x, s, b, groups, 1e-6)))()
    flax_gn = lambda x, s, b: group_norm_module._gn_flax(x, s, b, groups, 1e-6, jnp.float32)  # noqa: E731
    ref = jax.jit(lambda: run(flax_gn))()
    for name, a, b in zip(("y", "dx", "dscale", "dbias"), ours, ref):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), name
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(group_norm(x, scale, bias, groups, 1e-6) * g))).lower(
        x
    )
    assert "ddpm_group_norm_fwd" in hlo.as_text() and "ddpm_group_norm_bwd" in hlo.as_text()


def test_cpu_kernels_work_under_vmap():
    """``jax.vmap`` over a differentiated GroupNorm + Winograd convolution (what per-group
    gradient clipping does to the train step) runs the custom calls once per element and gives
    the per-element results."""
    from diffusion.models import conv

    x, scale, bias = _inputs((3, 2, 8, 8, 64), seed=13)
    k = jnp.asarray(np.random.default_rng(14).standard_normal((3, 3, 64, 64)) * 0.05, jnp.float32)

    def loss(x):
        h = group_norm(x, scale, bias, 32, 1e-6)
        return jnp.sum(jnp.cos(conv.conv3x3(h, k, ("w4", "w4", "w4"))))

    per_elem = jax.jit(jax.vmap(jax.grad(loss)))(x)
    for i in range(x.shape[0]):
        np.testing.assert_allclose(per_elem[i], jax.grad(loss)(x[i]), rtol=0, atol=1e-5)
