"""Tests of the 3x3 convolution implementations (diffusion/models/conv.py) and of
``runtime.conv_impl``: every method's output, input gradient and weight gradient against
``lax.conv_general_dilated`` (fp32), the whole tiny U-Net with Winograd against XLA's conv, the
parameter tree, the 'auto' rule off CPU, and the error for a bad value.

fp32 tolerances (relative to the largest magnitude of the reference, ``max|a-b| / max|b|``):
  * F(2x2, 3x3) ('w2'):  2e-6 (measured 1e-7..5e-7, the same order as lax.conv's own rounding);
  * F(4x4, 3x3) ('w4'):  2e-5 (measured 2e-6..5e-6: its transforms hold 1/24 .. 8, which
    amplifies fp32 rounding about 10x; the float64 check below pins that to the transforms).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models import conv, get_model
from diffusion.models.unet import UNet

TOL = {"xla": 1e-6, "w2": 2e-6, "w4": 2e-5}
SHAPES = [  # (N, H, W, Cin, Cout): even, odd and tiny spatial sizes, 1 and many channels
    (2, 8, 8, 4, 5),
    (1, 7, 5, 3, 6),
    (2, 1, 1, 2, 2),
    (1, 6, 10, 16, 8),
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _data(shape, seed=0):
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    k = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    g = rng.standard_normal((n, h, w, cout)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(k), jnp.asarray(g)


def _ref_grads(x, k, g):
    return jax.grad(lambda x, k: jnp.sum(conv.xla_conv(x, k) * g), argnums=(0, 1))(x, k)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["w2", "w4"])
def test_winograd_forward_matches_lax_conv(shape, method):
    x, k, _ = _data(shape)
    m = {"w2": 2, "w4": 4}[method]
    y = jax.jit(lambda x, k: conv.winograd_conv(x, k, m))(x, k)
    assert y.shape == shape[:3] + (shape[4],) and y.dtype == jnp.float32
    assert _rel(y, conv.xla_conv(x, k)) < TOL[method]


@pytest.mark.slow
def test_winograd_error_comes_from_fp32_rounding():
    """In float64 both transforms are exact to ~1e-15: the fp32 error above is rounding only."""
    x, k, _ = _data((2, 8, 8, 8, 4))
    x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64)
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(
        np.einsum("nhwc,ck->nhwk", xp[:, i : i + 8, j : j + 8], k64[i, j])
        for i in range(3)
        for j in range(3)
    )
    with jax.enable_x64(True):
        for m in (2, 4):
            y = conv.winograd_conv(jnp.asarray(x64), jnp.asarray(k64), m)
            assert y.dtype == jnp.float64
            assert _rel(y, ref) < 1e-12, m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "plan",
    [
        ("w2", "w2", "w2"),
        ("w4", "w4", "w4"),
        ("xla", "xla", "w2"),
        ("xla", "w4", "xla"),
        ("w2", "xla", "w4"),
    ],
)
@pytest.mark.slow
def test_planned_conv_output_and_gradients(shape, plan):
    """conv3x3 with every direction's method: y, dL/dx and dL/dw against lax.conv's autodiff."""
    x, k, g = _data(shape, seed=1)
    y = jax.jit(lambda x, k: conv.conv3x3(x, k, plan))(x, k)
    dx, dk = jax.jit(jax.grad(lambda x, k: jnp.sum(conv.conv3x3(x, k, plan) * g), argnums=(0, 1)))(
        x, k
    )
    rdx, rdk = _ref_grads(x, k, g)
    assert _rel(y, conv.xla_conv(x, k)) < TOL[plan[0]]
    assert _rel(dx, rdx) < TOL[plan[1]]
    assert _rel(dk, rdk) < TOL[plan[2]]
    assert dx.shape == x.shape and dk.shape == k.shape


@pytest.mark.slow
def test_winograd_wgrad_function():
    x, k, g = _data((2, 9, 7, 6, 3), seed=2)
    _, rdk = _ref_grads(x, k, g)
    for m, method in ((2, "w2"), (4, "w4")):
        assert _rel(conv.winograd_wgrad(x, g, m), rdk) < TOL[method]


def test_chunk_images_is_the_largest_divisor_within_the_row_budget():
    # 32x32 with F(2,3): 256 tiles per image; 16x16: 64; F(4,3) at 32x32: 64 tiles of 36 parts,
    # budget 1024 * 16 / 36 = 455 rows; at 16x16: 16 tiles.
    assert conv._chunk_images(32, 32, 32, 2, max_rows=1024) == 4
    assert conv._chunk_images(8, 32, 32, 2, max_rows=1024) == 4
    assert conv._chunk_images(32, 16, 16, 2, max_rows=1024) == 16
    assert conv._chunk_images(32, 32, 32, 4, max_rows=1024) == 4
    assert conv._chunk_images(32, 16, 16, 4, max_rows=1024) == 16
    assert conv._chunk_images(6, 8, 8, 2, max_rows=40) == 2  # 16 tiles: 2 fit, 3 divides 6 but not
    assert conv._chunk_images(7, 64, 64, 2, max_rows=100) == 1  # one image exceeds: 1 at a time
    assert conv._chunk_images(3, 4, 4, 2, max_rows=1024) == 3  # all fit: no chunks


@pytest.mark.parametrize("plan", [("w2", "w2", "w2"), ("w4", "w4", "w4"), ("xla", "w2", "w4")])
def test_batch_chunks_give_the_same_output_and_gradients(plan, monkeypatch):
    """With a budget of 8 tile rows (8x8 images: 16 tiles each for w2 -> 6 chunks of 1 image; 4
    of 36 parts for w4, budget 3 rows -> 6 chunks of 1) the batch of 6 goes through lax.map /
    lax.scan, and the forward,
    the input gradient and the summed weight gradient still equal lax.conv's."""
    monkeypatch.setattr(conv, "MAX_TILE_ROWS", 8)
    monkeypatch.setattr(conv, "W2_WGRAD_MAX_TILE_ROWS", 8)
    x, k, g = _data((6, 8, 8, 4, 5), seed=3)

    def loss(x, k):
        return jnp.sum(conv.conv3x3(x, k, plan) * g)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k))
    assert "scan" in jaxpr  # the batch really went in chunks
    y = jax.jit(lambda x, k: conv.conv3x3(x, k, plan))(x, k)
    dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k)
    rdx, rdk = _ref_grads(x, k, g)
    assert _rel(y, conv.xla_conv(x, k)) < TOL[plan[0]]
    assert _rel(dx, rdx) < TOL[plan[1]]
    assert _rel(dk, rdk) < TOL[plan[2]]


def test_w2_weight_gradient_has_its_own_smaller_chunks():
    """The F(2,3) weight gradient runs ``W2_WGRAD_MAX_TILE_ROWS`` tile rows at a time (64: 4
    images of 8x8), whatever `MAX_TILE_ROWS` allows the other directions: at batch 8 the forward
    and input gradient take the whole batch and the weight gradient two chunks of 4, and it
    still equals lax.conv's."""
    assert conv.W2_WGRAD_MAX_TILE_ROWS == 64 and conv.MAX_TILE_ROWS >= 128
    x, k, g = _data((8, 8, 8, 4, 5), seed=4)

    def loss(x, k):
        return jnp.sum(conv.conv3x3(x, k, ("w2", "w2", "w2")) * g)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, k)
    lengths = [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert lengths == [2]  # only the weight gradient goes in chunks, two of 4 images
    dx, dk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k)
    rdx, rdk = _ref_grads(x, k, g)
    assert _rel(dx, rdx) < TOL["w2"] and _rel(dk, rdk) < TOL["w2"]


def test_xla_plan_is_plain_lax_conv():
    """The all-XLA plan is exactly lax.conv (no custom_vjp in the program)."""
    x, k, _ = _data(SHAPES[0])
    jaxpr = str(jax.make_jaxpr(lambda x, k: conv.conv3x3(x, k, conv.PLANS["xla"]))(x, k))
    assert "custom_vjp" not in jaxpr and "conv_general_dilated" in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda x, k: conv.conv3x3(x, k, conv.PLANS["winograd"]))(x, k))
    assert "conv_general_dilated" not in jaxpr  # no XLA conv left with Winograd


def test_conv3x3_rejects_bad_plans():
    x, k, _ = _data(SHAPES[0])
    with pytest.raises(ValueError, match="plan must be"):
        conv.conv3x3(x, k, ("w3", "xla", "xla"))
    with pytest.raises(ValueError, match="kernel"):
        conv.conv3x3(x, jnp.zeros((1, 1, 4, 5)), conv.PLANS["winograd"])


# ----------------------------------------------------------------------------------------------
# The U-Net with conv_impl
# ----------------------------------------------------------------------------------------------
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), out_ch=3)


def _random_params(params, seed=3):
    """Non-trivial values for every leaf (the 'zero' layers included)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    out = []
    for leaf in leaves:
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        scale = 1.0 / np.sqrt(fan_in) if leaf.ndim > 1 else 0.1
        out.append(jnp.asarray(rng.standard_normal(leaf.shape) * scale, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def _unet_setup():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([3, 700], jnp.int32)
    params = UNet(**TINY, conv_impl="xla").init(jax.random.PRNGKey(0), x, t, train=False)["params"]
    return x, t, _random_params(params)


def _loss_and_grads(conv_impl, params, x, t):
    model = UNet(**TINY, conv_impl=conv_impl)

    def loss(p, x):
        out = model.apply({"params": p}, x, t, train=False)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), (gp, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return out, gp, gx


@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", ["winograd", "mixed", "winograd4", "auto"])
def test_unet_output_and_gradients_match_xla(conv_impl):
    """The whole tiny U-Net: output, input gradient and every parameter gradient within 1e-5
    relative of the lax.conv version for F(2,3) ('winograd', 'mixed'; also 'auto', which uses
    F(2,3)/F(4,3) per layer on CPU) and 1e-4 for F(4,3) everywhere ('winograd4')."""
    tol = 1e-4 if conv_impl in ("winograd4", "auto") else 1e-5
    x, t, params = _unet_setup()
    ref_out, ref_gp, ref_gx = _loss_and_grads("xla", params, x, t)
    out, gp, gx = _loss_and_grads(conv_impl, params, x, t)
    assert _rel(out, ref_out) < tol
    assert _rel(gx, ref_gx) < tol
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_gp)
    flat = jax.tree_util.tree_leaves(gp)
    scale = max(float(np.abs(b).max()) for _, b in flat_ref)
    errs = []
    for (path, b), a in zip(flat_ref, flat):
        name = jax.tree_util.keystr(path)
        if float(np.abs(b).max()) < 1e-4 * scale:
            # Gradients that are 0 analytically hold only rounding noise in both versions (relative
            # error ~1 by construction): the attention key bias (softmax ignores a per-row constant)
            # and, with 1 channel per GroupNorm group (ch=32, 32 groups), the timestep projection of
            # the first level (GroupNorm removes a per-channel constant). Judge those against the
            # largest gradient of the network instead.
            errs.append((float(np.abs(np.asarray(a) - np.asarray(b)).max()) / scale, name))
            continue
        errs.append((_rel(a, b), name))
    assert max(errs)[0] < tol, max(errs)


@pytest.mark.slow
def test_unet_auto_trains_with_f43_within_1e_5_of_xla():
    """A U-Net whose 16x16 layers have 64 channels, so that ``auto`` runs its CPU training plan
    there (F(4,3) forward, input and weight gradient, with the C++ transforms where built) and
    F(2,3) in all three directions at 8x8: output, input gradient and every parameter gradient
    within 1e-5 relative of lax.conv (measured on the CIFAR10 U-Net: 1.7e-6, 1.0e-6, <= 2.2e-6)."""
    if jax.default_backend() != "cpu":
        pytest.skip(
            "auto runs the Winograd training plan only on CPU; on GPU/TPU it is XLA's conv, checked by test_auto_is_xla_off_cpu_and_for_bf16"
        )
    cfg = dict(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), out_ch=3)
    assert conv.auto_choice((2, 16, 16, 64), 64, jnp.float32) == conv.PLANS["winograd4"]
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 16, 16, 3)), jnp.float32)
    t = jnp.asarray([5, 900], jnp.int32)
    init = UNet(**cfg, conv_impl="xla").init(jax.random.PRNGKey(1), x, t, train=False)
    params = _random_params(init["params"], seed=9)

    def run(conv_impl):
        model = UNet(**cfg, conv_impl=conv_impl)

        def loss(p, x):
            out = model.apply({"params": p}, x, t, train=False)
            return jnp.sum(out * jnp.cos(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (_, ref_out), (ref_gp, ref_gx) = run("xla")
    (_, out), (gp, gx) = run("auto")
    assert _rel(out, ref_out) < 1e-5 and _rel(gx, ref_gx) < 1e-5
    for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(ref_gp), jax.tree.leaves(gp)):
        if float(np.abs(b).max()) > 1e-6:  # analytically-zero gradients: see the test above
            assert _rel(a, b) < 1e-5, jax.tree_util.keystr(path)


def test_unet_winograd_really_replaces_the_convs():
    x, t, params = _unet_setup()
    n_conv = {}
    for impl in ("xla", "winograd"):
        jaxpr = jax.make_jaxpr(
            lambda p: UNet(**TINY, conv_impl=impl).apply({"params": p}, x, t, train=False)
        )(params)
        n_conv[impl] = str(jaxpr).count("conv_general_dilated")
    # XLA: conv_in, 2 per ResBlock (2 down + 2 mid + 4 up), the up-level upsample conv, conv_out
    # (19 stride-1 3x3) + the stride-2 downsample conv; Winograd leaves only the stride-2 one.
    assert n_conv["xla"] == 20 and n_conv["winograd"] == 1, n_conv


@pytest.mark.slow
def test_parameter_tree_identical_across_impls():
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    trees = {}
    for impl in conv.IMPLS:
        shapes = jax.eval_shape(
            lambda x, t: UNet(**TINY, conv_impl=impl).init(
                jax.random.PRNGKey(0), x, t, train=False
            ),
            x,
            t,
        )
        trees[impl] = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), shapes)
    for impl in conv.IMPLS:
        assert trees[impl] == trees["xla"], impl


def test_invalid_conv_impl_raises_clear_error():
    model = get_model(
        {"name": "ddpm_unet", **{k: v for k, v in TINY.items() if k != "out_ch"}},
        out_ch=3,
        runtime={"conv_impl": "fast"},
    )
    x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match=r"runtime.conv_impl='fast' is not one of"):
        model.init(jax.random.PRNGKey(0), x, t, train=False)
    with pytest.raises(ValueError, match=r"runtime.conv_impl='fast' is not one of"):
        UNet(**TINY, conv_impl="fast").init(jax.random.PRNGKey(0), x, t, train=False)
    with pytest.raises(ValueError, match="conv_impl"):
        conv.check_conv_impl(None)


def test_get_model_accepts_every_conv_impl():
    for impl in conv.IMPLS:
        model = get_model(
            {"name": "ddpm_unet", **{k: v for k, v in TINY.items() if k != "out_ch"}},
            out_ch=3,
            runtime={"conv_impl": impl},
        )
        assert model.conv_impl == impl


def test_auto_is_xla_off_cpu_and_for_bf16():
    for backend in ("gpu", "tpu", "cuda", "rocm"):
        assert (
            conv.auto_choice((8, 32, 32, 128), 128, jnp.float32, backend=backend)
            == conv.PLANS["xla"]
        )
    assert conv.auto_choice((8, 32, 32, 128), 128, jnp.bfloat16, backend="cpu") == conv.PLANS["xla"]
    plan = conv.auto_choice((8, 32, 32, 128), 128, jnp.float32, backend="cpu")
    assert len(plan) == 3 and all(p in conv.METHODS for p in plan)
    # a 3-channel layer (the RGB in/out convs) stays on XLA's conv on CPU
    assert conv.auto_choice((8, 32, 32, 3), 128, jnp.float32, backend="cpu") == conv.PLANS["xla"]
    # under 16x16: F(2,3) in all three directions
    assert conv.auto_choice((8, 4, 4, 256), 256, jnp.float32, backend="cpu") == ("w2", "w2", "w2")
    assert conv.auto_choice((8, 8, 8, 512), 256, jnp.float32, backend="cpu") == ("w2", "w2", "w2")
    # at least 16x16: F(4,3) in all three directions
    for shape, cout in (((8, 16, 16, 256), 256), ((8, 32, 32, 128), 128), ((32, 32, 32, 384), 128)):
        assert conv.auto_choice(shape, cout, jnp.float32, backend="cpu") == conv.PLANS["winograd4"]


def test_infer_method_runs_only_when_not_differentiated():
    """``conv3x3(..., infer=m)``: the undifferentiated forward (sampling, evaluation) is method
    ``m``'s, bit for bit; under ``jax.grad`` the plan's methods run (same gradients as without
    ``infer``); both forwards agree with lax.conv within their tolerances."""
    x, k, g = _data((2, 8, 8, 16, 8), seed=5)
    plan = ("w2", "w2", "w2")
    y = jax.jit(lambda x, k: conv.conv3x3(x, k, plan, infer="w4"))(x, k)
    np.testing.assert_array_equal(y, jax.jit(lambda x, k: conv._fwd_method("w4", x, k))(x, k))
    y2 = jax.jit(lambda x, k: conv.conv3x3(x, k, plan))(x, k)
    assert not np.array_equal(np.asarray(y), np.asarray(y2))  # F(4,3) really ran, not F(2,3)
    assert _rel(y, conv.xla_conv(x, k)) < TOL["w4"] and _rel(y2, conv.xla_conv(x, k)) < TOL["w2"]

    def grads(infer):
        f = lambda x, k: jnp.sum(conv.conv3x3(x, k, plan, infer=infer) * g)  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, k)

    for a, b in zip(grads("w4"), grads(None)):
        np.testing.assert_array_equal(a, b)
    # the all-XLA plan with a Winograd inference forward still differentiates like lax.conv
    dx, dk = jax.jit(
        jax.grad(
            lambda x, k: jnp.sum(conv.conv3x3(x, k, conv.PLANS["xla"], infer="w2") * g), (0, 1)
        )
    )(x, k)
    rdx, rdk = _ref_grads(x, k, g)
    assert _rel(dx, rdx) < TOL["xla"] and _rel(dk, rdk) < TOL["xla"]
    with pytest.raises(ValueError, match="infer"):
        conv.conv3x3(x, k, plan, infer="fft")


def test_auto_inference_rule_and_its_use_by_flax_conv():
    """``auto``'s forward-only rule: the forward of the training plan (F(4,3) at >= 16x16,
    F(2,3) below, XLA for 3 channels); XLA off CPU and for bf16. A flax ``nn.Conv`` built with
    ``conv_impl='auto'`` runs that method when not differentiated."""
    rule = conv.auto_infer_choice
    assert rule((8, 16, 16, 256), 256, jnp.float32, backend="cpu") == "w4"
    assert rule((8, 32, 32, 384), 128, jnp.float32, backend="cpu") == "w4"
    assert rule((8, 32, 32, 128), 128, jnp.float32, backend="cpu") == "w4"
    assert rule((8, 8, 8, 512), 256, jnp.float32, backend="cpu") == "w2"
    assert rule((8, 32, 32, 3), 128, jnp.float32, backend="cpu") == "xla"
    assert rule((8, 16, 16, 256), 256, jnp.float32, backend="gpu") == "xla"
    assert rule((8, 16, 16, 256), 256, jnp.bfloat16, backend="cpu") == "xla"
    if jax.default_backend() != "cpu":
        pytest.skip(
            "the flax-level half builds the CPU plan; off CPU auto is XLA's conv, checked by the rule asserts above"
        )
    import flax.linen as nn

    x, k, _ = _data((1, 16, 16, 256, 64), seed=6)
    layer = nn.Conv(
        64, (3, 3), padding="SAME", conv_general_dilated=conv.conv_general_dilated_for("auto")
    )
    params = {"params": {"kernel": k, "bias": jnp.zeros((64,))}}
    y = jax.jit(layer.apply)(params, x)
    np.testing.assert_array_equal(y, jax.jit(lambda x, k: conv._fwd_method("w4", x, k))(x, k))


# ----------------------------------------------------------------------------------------------
# The one forward-only rule, `conv.infer_method`, of the U-Net and the FID Inception network
# ----------------------------------------------------------------------------------------------
# What each network's 'auto' chose before the two rules became one (written down by hand, not
# computed by the code under test): the Inception's per-kernel-shape rule and the U-Net's
# forward-only rule, on CPU float32.
def _old_inception_auto(k, s, p, cin, cout):
    if k == (1, 1) and s == 1 and p == 0:
        return "dot"
    if min(cin, cout) < 64:
        return "xla"
    if k == (3, 3) and s == 1 and p in (0, 1):
        return "w2"  # also at >= 16x16: F(4,3) lost on the Inception's 35x35 layers
    if k == (3, 3) and s == 2 and p == 0:
        return "taps"
    return "xla"


def _old_unet_auto(h, w, cin, cout):
    if min(cin, cout) < 64:
        return "xla"
    return "w4" if min(h, w) >= 16 else "w2"


def _inception_layers():
    """[(path, kernel, stride, padding, input shape, cout)] of all 94 ConvBN layers, as traced."""
    import flax.linen as nn

    from diffusion.metrics.inception import network

    layers = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, network.ConvBN) and context.method_name == "__call__":
            layers.append((m.path, m.kernel_size, m.stride, m.padding, args[0].shape, m.features))
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, network.INPUT_SIZE, network.INPUT_SIZE, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(
            network.InceptionV3WithLogits(conv_impl="xla").init, jax.random.PRNGKey(0), x
        )
    return layers


def _cifar10_unet_convs():
    """[(kernel, strides, input shape, cout)] of every nn.Conv of the CIFAR10 U-Net, as traced."""
    import flax.linen as nn

    from diffusion import factories
    from experiments import cifar10

    model = factories.create_model(cifar10.get_config())
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    variables = jax.eval_shape(
        lambda x, t: model.init(jax.random.PRNGKey(0), x, t, train=False), x, t
    )
    convs = []

    def record(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, nn.Conv) and context.method_name == "__call__":
            convs.append((tuple(m.kernel_size), tuple(m.strides), args[0].shape, m.features))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x, t: model.apply(v, x, t, train=False), variables, x, t)
    return model, variables, convs


def test_infer_method_gives_each_inception_layer_its_former_method(monkeypatch):
    """Every conv of the FID Inception network: `infer_method` (via ``conv_method('auto')`` with
    the layer's input size) gives what the Inception's own rule gave (1x1 -> dot, 3x3 stride 1
    -> F(2,3), 3x3 stride 2 VALID -> taps with >= 64 channels, else XLA), on CPU float32; XLA
    off CPU and for bf16. And ConvBN really runs that method (its input h, w reach the rule)."""
    from collections import Counter

    from diffusion.metrics.inception import network

    layers = _inception_layers()
    assert len(layers) == 94
    got = Counter()
    for path, k, s, p, (_, h, w, cin), cout in layers:
        expected = _old_inception_auto(k, s, p, cin, cout)
        assert conv.infer_method(k, s, p, h, w, cin, cout, jnp.float32, "cpu") == expected, path
        assert network.conv_method("auto", k, s, p, h, w, cin, cout, jnp.float32, "cpu") == expected
        for backend, dtype in (("gpu", jnp.float32), ("tpu", jnp.float32), ("cpu", jnp.bfloat16)):
            assert network.conv_method("auto", k, s, p, h, w, cin, cout, dtype, backend) == "xla"
        got[expected] += 1
    assert got == {"dot": 40, "w2": 10, "taps": 4, "xla": 40}
    if jax.default_backend() != "cpu":
        pytest.skip("the traced half runs the CPU rule; off CPU 'auto' is XLA, asserted above")
    used = []
    real = network._conv_by

    def spy(method, *args):
        used.append(method)
        return real(method, *args)

    monkeypatch.setattr(network, "_conv_by", spy)
    x = jax.ShapeDtypeStruct((1, network.INPUT_SIZE, network.INPUT_SIZE, 3), jnp.float32)
    jax.eval_shape(network.InceptionV3WithLogits(conv_impl="auto").init, jax.random.PRNGKey(0), x)
    assert used == [_old_inception_auto(k, s, p, sh[-1], c) for _, k, s, p, sh, c in layers]


def test_infer_method_gives_each_cifar10_unet_layer_its_former_method(monkeypatch):
    """Every 3x3 stride-1 conv of the CIFAR10 U-Net (32x32 .. 4x4): `auto_infer_choice` (now
    `infer_method` with kernel 3x3, stride 1, padding 1) gives the former forward-only rule's
    method (F(4,3) at >= 16x16, F(2,3) below, XLA under 64 channels) on CPU float32, XLA off CPU
    and for bf16; the traced network asks the rule for exactly these layers."""
    from collections import Counter

    model, variables, convs = _cifar10_unet_convs()
    s1 = [(shape, cout) for k, s, shape, cout in convs if k == (3, 3) and s == (1, 1)]
    assert len(s1) == 49 and len(convs) == 52  # + the 3 stride-2 downsampling convs (XLA)
    got = Counter()
    for shape, cout in s1:
        _, h, w, cin = shape
        expected = _old_unet_auto(h, w, cin, cout)
        assert conv.auto_infer_choice(shape, cout, jnp.float32, backend="cpu") == expected, shape
        assert conv.infer_method((3, 3), 1, 1, h, w, cin, cout, jnp.float32, "cpu") == expected
        for backend, dtype in (("gpu", jnp.float32), ("cpu", jnp.bfloat16)):
            assert conv.auto_infer_choice(shape, cout, dtype, backend=backend) == "xla"
        got[expected] += 1
    assert got == {"w4": 22, "w2": 25, "xla": 2}
    asked = []
    real = conv.resolve_infer

    def spy(conv_impl, shape, cout, dtype):
        asked.append((tuple(shape), cout))
        return real(conv_impl, shape, cout, dtype)

    monkeypatch.setattr(conv, "resolve_infer", spy)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.int32)
    jax.eval_shape(lambda v, x, t: model.apply(v, x, t, train=False), variables, x, t)
    assert asked == [(tuple(shape), cout) for shape, cout in s1]


def test_infer_method_takes_f43_only_on_multiples_of_4():
    """A 3x3 stride-1 layer gets F(4,3) at >= 16x16 only when both sides are multiples of 4 (an
    F(4,3) tile covers 4x4 outputs; the Inception's 35x35 layers keep F(2,3))."""
    rule = lambda h, w, p=1: conv.infer_method((3, 3), 1, p, h, w, 96, 96, jnp.float32, "cpu")  # noqa: E731
    assert [rule(16, 16), rule(36, 36), rule(32, 64), rule(12, 12)] == ["w4", "w4", "w4", "w2"]
    assert [rule(35, 35), rule(18, 18), rule(36, 35), rule(73, 73, 0)] == ["w2"] * 4
    assert conv.infer_method(3, 1, 1, 32, 32, 96, 96, jnp.float32, "cpu") == "w4"  # int kernel
    assert conv.infer_method((3, 3), 1, (1, 0), 32, 32, 96, 96, jnp.float32, "cpu") == "xla"
