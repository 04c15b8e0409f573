"""Tests of the DDPM U-Net (diffusion/models) against independent truth.

* exact parameter counts of the paper's models (docs/reference.md), via ``jax.eval_shape`` (no compile);
* the timestep embedding against a NumPy evaluation of the formula;
* the whole forward pass against a second, pure-NumPy implementation written here from the
  formulas (GroupNorm, SAME convs by im2col, attention, nearest upsampling, skip topology);
* attention placement and skip connections read from traced shapes / the jaxpr;
* dropout, jit + grad, remat and bf16 behaviour; config validation messages.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models import MODELS, get_model
from diffusion.models.layers import AttnBlock, get_timestep_embedding
from diffusion.models.unet import UNet, validate_unet_config

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), out_ch=3)


def _inputs(batch=2, size=8, channels=3, seed=0):
    kx, kt = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (batch, size, size, channels), jnp.float32)
    t = jax.random.randint(kt, (batch,), 0, 1000)
    return x, t


def _param_count(model, size, channels=3):
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, t, train=False), x, t)
    return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(shapes))


def _random_params(model, size=8, seed=1):
    """Random, non-trivial parameters in the model's tree without running ``init`` (cheap):
    kernels ~ N(0, 1/fan_in) -- including the "zero" layers conv2 / proj_out / conv_out, so their
    contribution is not ~0 --, biases ~ N(0, 0.1^2), GroupNorm scales ~ 1 + N(0, 0.1^2)."""
    shapes = _abstract_params(model, size)[0]["params"]
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    out = []
    for path, leaf in leaves:
        kind = path[-1].key
        if kind == "bias":
            value = 0.1 * rng.standard_normal(leaf.shape)
        elif kind == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            assert kind == "kernel", path
            value = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        out.append(jnp.asarray(value, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def _abstract_params(model, size):
    """Parameter shapes via jax.eval_shape (nothing is computed or compiled)."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return (
        jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, t, train=False), x, t),
        x,
        t,
    )


# ------------------------------------------------------------------------------------------------
# Parameter counts (docs/reference.md, exact integers)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ch_mult,size,out_ch,expected",
    [
        ((1, 2, 2, 2), 32, 3, 35_746_307),
        ((1, 2, 2, 2), 32, 6, 35_749_766),
        ((1, 1, 2, 2, 4, 4), 256, 3, 113_673_219),
    ],
)
def test_param_counts(ch_mult, size, out_ch, expected):
    model = UNet(
        ch=128,
        ch_mult=ch_mult,
        num_res_blocks=2,
        attn_resolutions=(16,),
        out_ch=out_ch,
        dropout=0.1,
    )
    assert _param_count(model, size) == expected


def test_param_count_independent_of_remat_and_dtype():
    base = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), out_ch=3)
    model = UNet(**base, remat=True, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(lambda x, t: model.init(jax.random.PRNGKey(0), x, t, train=False), x, t)
    leaves = jax.tree_util.tree_leaves(shapes)
    assert sum(math.prod(a.shape) for a in leaves) == 35_746_307
    assert all(a.dtype == jnp.float32 for a in leaves)


# ------------------------------------------------------------------------------------------------
# Timestep embedding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [128, 33])
def test_timestep_embedding_matches_numpy_formula(dim):
    t = np.array([0, 1, 17, 500, 999])
    half = dim // 2
    freqs = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
    ref = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    if dim % 2:
        ref = np.pad(ref, ((0, 0), (0, 1)))
    got = np.asarray(get_timestep_embedding(jnp.asarray(t, jnp.int32), dim))
    assert got.shape == (5, dim) and got.dtype == np.float32
    # float32 t*f at t~1000 carries ~6e-5 absolute error in the argument.
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=0)
    np.testing.assert_array_equal(got[0, :half], 0.0)
    np.testing.assert_array_equal(got[0, half : 2 * half], 1.0)


# ------------------------------------------------------------------------------------------------
# A second, independent implementation in NumPy (float64)
# ------------------------------------------------------------------------------------------------
def np_swish(x):
    return x / (1.0 + np.exp(-x))


def np_group_norm(x, p, groups=32, eps=1e-6):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    xn = ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return xn * p["scale"] + p["bias"]


def np_conv(x, p, stride=1):
    """Cross-correlation with TF 'SAME' padding, by explicit im2col. kernel [kh, kw, in, out]."""
    k, bias = p["kernel"], p["bias"]
    b, h, w, c = x.shape
    kh, kw, _, o = k.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph = max((oh - 1) * stride + kh - h, 0)
    pw = max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    cols = np.empty((b, oh, ow, kh, kw, c))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = xp[
                :, i : i + stride * oh : stride, j : j + stride * ow : stride, :
            ]
    return cols.reshape(b, oh, ow, kh * kw * c) @ k.reshape(kh * kw * c, o) + bias


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_resblock(p, x, temb):
    h = np_conv(np_swish(np_group_norm(x, p["norm1"])), p["conv1"])
    h = h + np_dense(np_swish(temb), p["temb_proj"])[:, None, None, :]
    h = np_conv(np_swish(np_group_norm(h, p["norm2"])), p["conv2"])
    if "nin_shortcut" in p:
        x = np_dense(x, p["nin_shortcut"])
    return x + h


def np_attn(p, x):
    b, hh, ww, c = x.shape
    h = np_group_norm(x, p["norm"])
    q, k, v = (np_dense(h, p[n]).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    out = np.empty_like(q)
    for n in range(b):
        logits = q[n] @ k[n].T / np.sqrt(c)  # [queries, keys]
        logits -= logits.max(axis=1, keepdims=True)
        wts = np.exp(logits)
        wts /= wts.sum(axis=1, keepdims=True)
        out[n] = wts @ v[n]
    return x + np_dense(out.reshape(b, hh, ww, c), p["proj_out"])


def np_unet(params, x, t, *, ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv):
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    half = ch // 2
    f = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
    tt = np.asarray(t, np.float64)[:, None] * f
    temb = np.concatenate([np.sin(tt), np.cos(tt)], axis=1)
    temb = np_dense(temb, p["temb"]["dense0"])
    temb = np_dense(np_swish(temb), p["temb"]["dense1"])

    skips = [np_conv(x, p["conv_in"])]
    n = len(ch_mult)
    for lvl in range(n):
        for blk in range(num_res_blocks):
            h = np_resblock(p[f"down_{lvl}_block_{blk}"], skips[-1], temb)
            if h.shape[1] in attn_resolutions:
                h = np_attn(p[f"down_{lvl}_attn_{blk}"], h)
            skips.append(h)
        if lvl != n - 1:
            h = skips[-1]
            if resamp_with_conv:
                h = np_conv(h, p[f"down_{lvl}_downsample"]["conv"], stride=2)
            else:
                b, hh, ww, c = h.shape
                h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
            skips.append(h)
    h = np_resblock(p["mid_block_1"], skips[-1], temb)
    h = np_attn(p["mid_attn_1"], h)
    h = np_resblock(p["mid_block_2"], h, temb)
    for lvl in reversed(range(n)):
        for blk in range(num_res_blocks + 1):
            h = np_resblock(p[f"up_{lvl}_block_{blk}"], np.concatenate([h, skips.pop()], -1), temb)
            if h.shape[1] in attn_resolutions:
                h = np_attn(p[f"up_{lvl}_attn_{blk}"], h)
        if lvl != 0:
            h = h.repeat(2, axis=1).repeat(2, axis=2)
            if resamp_with_conv:
                h = np_conv(h, p[f"up_{lvl}_upsample"]["conv"])
    assert not skips
    return np_conv(np_swish(np_group_norm(h, p["norm_out"])), p["conv_out"])


@pytest.mark.parametrize("resamp_with_conv", [True, False])
def test_forward_matches_numpy_reference(resamp_with_conv):
    model = UNet(**TINY, dropout=0.0, resamp_with_conv=resamp_with_conv)
    x, t = _inputs(batch=2, size=8)
    params = _random_params(model)
    out = np.asarray(model.apply({"params": params}, x, t, train=False))
    ref = np_unet(
        params,
        x,
        t,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        resamp_with_conv=resamp_with_conv,
    )
    assert out.shape == (2, 8, 8, 3) and out.dtype == np.float32
    assert np.abs(ref).mean() > 0.1  # the comparison is non-trivial
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Init, determinism, dropout
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_init_output_near_zero():
    model = UNet(**TINY, dropout=0.1)
    x, t = _inputs(batch=2, size=8)
    # An 'rbg' key only to keep this CPU test cheap; the initialisers do not depend on the PRNG.
    variables = model.init(jax.random.key(0, impl="rbg"), x, t, train=False)
    out0 = model.apply(variables, x, t, train=False)
    assert out0.shape == (2, 8, 8, 3) and out0.dtype == jnp.float32
    # conv_out is variance_scaling(1e-10, fan_avg): weight std = sqrt(1e-10 / fan_avg) ~ 8e-7 here,
    # so an output summing 9*32 unit-scale inputs has std ~ 1.4e-5 -- "~0" means < 1e-4, not 1e-6.
    assert 0 < float(jnp.max(jnp.abs(out0))) < 1e-4
    # Every ResBlock's conv2 and every AttnBlock's proj_out starts ~0 (|w| <= sqrt(3e-10/fan_avg)).
    zero_layers = [
        (p, l)
        for p, l in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
        if p[-1].key == "kernel" and p[-2].key in ("conv2", "proj_out", "conv_out")
    ]
    # 8 ResBlocks (2 down, 2 middle, 4 up), 4 AttnBlocks (1 down + 2 up at 4x4, 1 middle), output
    assert len(zero_layers) == 8 + 4 + 1
    assert all(float(jnp.max(jnp.abs(l))) < 1e-5 for _, l in zero_layers)


@pytest.mark.slow
def test_determinism_dropout_and_timestep():
    model = UNet(**TINY, dropout=0.3)
    x, t = _inputs(batch=2, size=8)
    params = {"params": _random_params(model)}
    ev1 = model.apply(params, x, t, train=False)
    ev2 = model.apply(params, x, t, train=False, rngs={"dropout": jax.random.PRNGKey(5)})
    np.testing.assert_array_equal(ev1, ev2)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    tr1 = model.apply(params, x, t, train=True, rngs={"dropout": k1})
    tr1b = model.apply(params, x, t, train=True, rngs={"dropout": k1})
    tr2 = model.apply(params, x, t, train=True, rngs={"dropout": k2})
    np.testing.assert_array_equal(tr1, tr1b)
    assert float(jnp.max(jnp.abs(tr1 - tr2))) > 1e-3
    assert float(jnp.max(jnp.abs(tr1 - ev1))) > 1e-3
    # the timestep reaches the output
    ev3 = model.apply(params, x, (t + 500) % 1000, train=False)
    assert float(jnp.max(jnp.abs(ev3 - ev1))) > 1e-3


# ------------------------------------------------------------------------------------------------
# Topology: attention placement, skip connections
# ------------------------------------------------------------------------------------------------
CIFAR = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), out_ch=3)


@pytest.mark.slow
def test_cifar_attention_blocks_placement():
    model = UNet(**CIFAR)
    variables, x, t = _abstract_params(model, 32)
    attn_names = sorted(k for k in variables["params"] if "attn" in k)
    # 2 per down level at 16x16 (level 1), 1 in the middle, 3 per up level at 16x16.
    assert attn_names == [
        "down_1_attn_0",
        "down_1_attn_1",
        "mid_attn_1",
        "up_1_attn_0",
        "up_1_attn_1",
        "up_1_attn_2",
    ]
    # Resolutions read from the traced activations of every AttnBlock.
    _, state = jax.eval_shape(
        lambda v, x, t: model.apply(
            v,
            x,
            t,
            train=False,
            mutable=["intermediates"],
            capture_intermediates=lambda m, _: isinstance(m, AttnBlock),
        ),
        variables,
        x,
        t,
    )
    shapes = {
        path[0].key: leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    }
    assert len(shapes) == 6
    at16 = sorted(k for k, s in shapes.items() if s[1:3] == (16, 16))
    assert len(at16) == 5 and "mid_attn_1" not in at16
    assert shapes["mid_attn_1"] == (1, 4, 4, 256)  # the middle attention sits at the lowest res


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(sub, "eqns"):
                    yield from _all_eqns(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    yield from _all_eqns(sub.jaxpr)


@pytest.mark.slow
@pytest.mark.parametrize("cfg,size", [(CIFAR, 32), (TINY, 8)])
def test_skip_connections(cfg, size):
    model = UNet(**cfg)
    variables, x, t = _abstract_params(model, size)
    jaxpr = jax.make_jaxpr(lambda v, x, t: model.apply(v, x, t, train=False))(variables, x, t)
    concats = [
        e
        for e in _all_eqns(jaxpr.jaxpr)
        if e.primitive.name == "concatenate" and len(e.outvars[0].aval.shape) == 4
    ]
    n = len(cfg["ch_mult"]) * (cfg["num_res_blocks"] + 1)
    assert len(concats) == n
    # Each concatenation joins h with the matching skip, independently book-kept here.
    ch, mult, nrb = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
    skip_ch = [ch] + [
        c
        for i, m in enumerate(mult)
        for c in [ch * m] * nrb + ([ch * m] if i < len(mult) - 1 else [])
    ]
    h_ch, expected = ch * mult[-1], []
    for lvl in reversed(range(len(mult))):
        for _ in range(nrb + 1):
            expected.append(h_ch + skip_ch.pop())
            h_ch = ch * mult[lvl]
    assert [c.outvars[0].aval.shape[-1] for c in concats] == expected
    assert not skip_ch


# ------------------------------------------------------------------------------------------------
# jit + grad, remat, bf16
# ------------------------------------------------------------------------------------------------
def _loss_and_grads(model, params, x, t, key):
    def loss_fn(p):
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": key})
        return jnp.mean(out**2), out

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


@pytest.mark.slow
def test_jit_grad_and_remat_equivalence():
    x, t = _inputs(batch=2, size=8)
    plain = UNet(**TINY, dropout=0.1)
    remat = UNet(**TINY, dropout=0.1, remat=True)
    top = UNet(**TINY, dropout=0.1, remat_resolutions=(8,))  # the 8x8 level's ResBlocks only
    params = _random_params(plain)
    # Same parameter tree with and without remat (checkpoints stay interchangeable).
    assert jax.tree_util.tree_structure(
        _abstract_params(remat, 8)[0]["params"]
    ) == jax.tree_util.tree_structure(params)
    key = jax.random.PRNGKey(3)  # dropout active: remat must replay the same masks
    (l1, o1), g1 = _loss_and_grads(plain, params, x, t, key)
    (l2, o2), g2 = _loss_and_grads(remat, params, x, t, key)
    assert np.isfinite(float(l1))
    leaves = jax.tree_util.tree_leaves(g1)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.sqrt(sum(jnp.sum(g**2) for g in leaves))) > 0
    np.testing.assert_allclose(o1, o2, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    (_, o3), g3 = _loss_and_grads(top, params, x, t, key)
    np.testing.assert_allclose(o1, o3, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(g3)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_remat_resolutions_default_and_validation():
    """Unset, the ResBlocks at heights >= 32 are recomputed on CPU with float32 compute (the
    measured memory/time trade, benchmarks/RESULTS.md §24), none on GPU/TPU or in bfloat16; an
    explicit height that the U-Net never has is a config error naming the heights it has."""
    from diffusion.models.unet import auto_remat_resolutions

    assert auto_remat_resolutions(32, backend="cpu") == (32,)
    assert auto_remat_resolutions(256, backend="cpu") == (256, 128, 64, 32)
    assert auto_remat_resolutions(16, backend="cpu") == ()
    assert auto_remat_resolutions(32, backend="gpu") == ()
    assert auto_remat_resolutions(32, jnp.bfloat16, backend="cpu") == ()
    with pytest.raises(ValueError, match=r"remat_resolutions has \[16\], which never occur"):
        UNet(**TINY, remat_resolutions=(16,)).validate(8)
    UNet(**TINY, remat_resolutions=(8, 4)).validate(8)


@pytest.mark.slow
def test_bfloat16_close_to_float32():
    x, t = _inputs(batch=2, size=8)
    f32 = UNet(**TINY)
    bf16 = UNet(**TINY, dtype=jnp.bfloat16)
    shapes = _abstract_params(bf16, 8)[0]
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(shapes))  # f32 params
    params = {"params": _random_params(f32)}
    a = f32.apply(params, x, t, train=False)
    b = jax.jit(lambda p, x, t: bf16.apply(p, x, t, train=False))(params, x, t)
    assert b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
    # bf16 has an 8-bit mantissa (relative rounding 2**-9 ~ 2e-3 per op); through ~20 layers the
    # output's relative L2 error stays at the 1e-2 level. Tolerance: 5e-2.
    assert 0 < rel < 5e-2, rel


# ------------------------------------------------------------------------------------------------
# Validation and registry
# ------------------------------------------------------------------------------------------------
def test_validate_unet_config_messages():
    assert validate_unet_config(32, 128, (1, 2, 2, 2), (16,)) == []
    assert validate_unet_config(256, 128, (1, 1, 2, 2, 4, 4), (16,)) == []
    (msg,) = validate_unet_config(30, 128, (1, 2, 2, 2), ())
    assert "30x30" in msg and "not divisible" in msg and "8" in msg
    (msg,) = validate_unet_config(32, 128, (1, 2, 2, 2), (16, 10))
    assert "attn_resolutions" in msg and "[10]" in msg and "[32, 16, 8, 4]" in msg
    (msg,) = validate_unet_config(32, 48, (1, 2), ())
    assert "GroupNorm" in msg and "[48]" in msg
    (msg,) = validate_unet_config(32, 16, (2, 4), ())
    assert "[16]" in msg
    assert len(validate_unet_config(30, 48, (1, 2, 2, 2), (5,))) == 3


@pytest.mark.parametrize(
    "kwargs,size,needle",
    [
        (dict(ch=32, ch_mult=(1, 2, 2, 2), attn_resolutions=()), 30, "not divisible by 2**"),
        (
            dict(ch=32, ch_mult=(1, 2), attn_resolutions=(5,)),
            16,
            "resolutions that occur are [16, 8]",
        ),
        (dict(ch=48, ch_mult=(1, 2), attn_resolutions=()), 16, "GroupNorm"),
    ],
)
def test_bad_configs_raise(kwargs, size, needle):
    model = UNet(**kwargs, num_res_blocks=1, out_ch=3)
    with pytest.raises(ValueError, match="Invalid U-Net configuration") as info:
        model.validate(size)
    assert needle in str(info.value)
    with pytest.raises(ValueError) as info:  # also at trace time, before any compute
        _abstract_params(model, size)
    assert needle in str(info.value)


def test_get_model_registry():
    import ml_collections

    cfg = ml_collections.ConfigDict(
        dict(
            name="ddpm_unet",
            ch=128,
            ch_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attn_resolutions=(16,),
            dropout=0.1,
            resamp_with_conv=True,
            dtype="bfloat16",
        )
    )
    model = get_model(cfg, out_ch=6, runtime={"remat": True})
    assert isinstance(model, UNet) and MODELS["ddpm_unet"] is UNet
    assert (model.out_ch, model.dtype, model.remat, model.ch_mult) == (
        6,
        jnp.bfloat16,
        True,
        (1, 2, 2, 2),
    )
    model = get_model(
        dict(
            name="ddpm_unet",
            ch=128,
            ch_mult=[1, 2, 2, 2],
            num_res_blocks=2,
            attn_resolutions=[16],
            dropout=0.1,
            dtype="float32",
        ),
        out_ch=6,
    )
    assert model.resamp_with_conv and model.dtype == jnp.float32
    assert _param_count(model, 32) == 35_749_766
    with pytest.raises(ValueError, match="registered: .*'ddpm_unet'"):
        get_model(dict(name="nope", ch=128), out_ch=3)
    with pytest.raises(ValueError, match="float16"):
        get_model(
            dict(
                name="ddpm_unet",
                ch=32,
                ch_mult=(1,),
                num_res_blocks=1,
                attn_resolutions=(),
                dropout=0.0,
                dtype="float16",
            ),
            out_ch=3,
        )
    with pytest.raises(ValueError, match="chmult"):
        get_model(
            dict(
                name="ddpm_unet",
                ch=32,
                chmult=(1,),
                num_res_blocks=1,
                attn_resolutions=(),
                dropout=0.0,
            ),
            out_ch=3,
        )
