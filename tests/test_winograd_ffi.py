"""Tests of the C++ Winograd F(2,3) transforms (diffusion/models/winograd_ffi.py +
winograd_cpu.cc): each custom call against the pure-JAX transform of conv.py that it replaces
(an independent second implementation of the same maths: the results must be identical, since
both do the same float32 additions in the same order), the whole convolution's output and both
gradients with and without the kernels, and the fallback when the kernels cannot be built.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion.models import conv, winograd_ffi

#: The tests that compare the C++ kernels with the pure-JAX forms need a compiler; the fallback
#: test at the end does not (it must run where there is none).
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "c++") is None, reason="no C++ compiler on this machine"
)

# (N, H, W, C): even and odd sizes, a single pixel, 1 / 3 / 17 (not a vector multiple) channels.
SHAPES = [(2, 8, 8, 4), (1, 7, 5, 3), (3, 1, 1, 17), (1, 6, 10, 1), (2, 9, 4, 128)]


def _x(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _tiles(shape, m=2):
    return -(-shape[1] // m), -(-shape[2] // m)


def _assert_same(a, b, m, scale=None):
    """F(2,3): identical (its only multiplications, by 1/2, are exact). F(4,3): its factors
    (5, 1/6, 1/24, ...) round, and XLA may fuse a product into the next addition (one rounding
    less) where the C++ code rounds both: equal to within a few float32 ulps of ``scale`` (the
    largest magnitude among all the parts: sums that cancel carry the rounding of their terms)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    if m == 2:
        np.testing.assert_array_equal(a, b)
    else:
        scale = np.abs(b).max() if scale is None else scale
        assert np.abs(a - b).max() <= 8 * np.finfo(np.float32).eps * max(scale, 1e-30)


def _assert_parts_equal(a, b, m):
    assert len(a) == len(b) == m + 2
    scale = max(float(np.abs(np.asarray(part)).max()) for row in b for part in row)
    for p in range(len(b)):
        assert len(a[p]) == len(b[p])
        for q in range(len(b)):
            _assert_same(a[p][q], b[p][q], m, scale)


@needs_compiler
def test_kernels_build_and_register_on_cpu():
    assert winograd_ffi.available(), winograd_ffi.unavailable_reason()
    assert winograd_ffi.usable(jnp.float32)
    assert not winograd_ffi.usable(jnp.bfloat16)


@needs_compiler
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_input_parts_equal_the_jax_transform(shape, m):
    x = _x(shape)
    th, tw = _tiles(shape, m)
    ref = jax.jit(lambda x: conv._input_tiles(x, m, th, tw))(x)
    _assert_parts_equal(jax.jit(lambda x: winograd_ffi.input_parts(x, m))(x), ref, m)


@needs_compiler
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_dm_parts_equal_the_jax_transform(shape, m):
    dy = _x(shape, 1)
    th, tw = _tiles(shape, m)
    ref = jax.jit(lambda d: conv._dm_tiles(d, m, th, tw))(dy)
    _assert_parts_equal(jax.jit(lambda d: winograd_ffi.dm_parts(d, m))(dy), ref, m)


@needs_compiler
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_output_equals_the_jax_transform(shape, m):
    n, h, w, k = shape
    th, tw = _tiles(shape, m)
    a = m + 2
    rng = np.random.default_rng(2)
    mm = [
        [jnp.asarray(rng.standard_normal((n * th * tw, k)).astype(np.float32)) for _ in range(a)]
        for _ in range(a)
    ]
    ref = jax.jit(lambda mm: conv._output_tiles(mm, m, shape))(mm)
    got = jax.jit(lambda mm: winograd_ffi.output(mm, shape, m))(mm)
    assert got.shape == shape
    _assert_same(got, ref, m)


@needs_compiler
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("cio", [(1, 1), (3, 5), (17, 128)])
@pytest.mark.parametrize("flip", [False, True])
def test_filter_parts_equal_the_jax_transform(cio, flip, m):
    w = _x((3, 3) + cio, 6)
    ref = jax.jit(lambda w: conv._filter_parts(w[::-1, ::-1] if flip else w, m))(w)
    _assert_parts_equal(jax.jit(lambda w: winograd_ffi.filter_parts(w, m, flip=flip))(w), ref, m)


@needs_compiler
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("cio", [(1, 1), (3, 5), (17, 128)])
def test_filter_grad_equals_the_jax_transform_and_is_the_adjoint(cio, m):
    a = m + 2
    rng = np.random.default_rng(7)
    du = [
        [jnp.asarray(rng.standard_normal(cio).astype(np.float32)) for _ in range(a)]
        for _ in range(a)
    ]
    got = jax.jit(lambda du: winograd_ffi.filter_grad(du, m))(du)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv, "_ffi_transforms", lambda m, dtype: False)
        ref = jax.jit(lambda du: conv._filter_grad(du, m))(du)
    assert got.shape == (3, 3) + cio
    _assert_same(got, ref, m)
    # <G w G^T, dU> = <w, G^T dU G>, in float64 on the float32 results
    w = _x((3, 3) + cio, 8)
    u = winograd_ffi.filter_parts(w, m)
    lhs = sum(
        float(np.sum(np.asarray(u[p][q], np.float64) * np.asarray(du[p][q], np.float64)))
        for p in range(a)
        for q in range(a)
    )
    rhs = float(np.sum(np.asarray(w, np.float64) * np.asarray(got, np.float64)))
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), 1.0)


@needs_compiler
@pytest.mark.parametrize("m", [2, 4])
def test_output_transform_is_the_transpose_of_the_dm_transform(m):
    """<A^T M A, dY> = <M, A dY A^T> summed over tiles: the dM kernel is the output kernel's
    adjoint (what makes the weight gradient right), checked in float64 on the results."""
    shape = (2, 7, 6, 5)
    n, h, w, k = shape
    th, tw = _tiles(shape, m)
    a = m + 2
    rng = np.random.default_rng(3)
    mm = [
        [jnp.asarray(rng.standard_normal((n * th * tw, k)).astype(np.float32)) for _ in range(a)]
        for _ in range(a)
    ]
    dy = _x(shape, 4)
    y = np.asarray(winograd_ffi.output(mm, shape, m), np.float64)
    dm = winograd_ffi.dm_parts(dy, m)
    lhs = float(np.sum(y * np.asarray(dy, np.float64)))
    rhs = sum(
        float(np.sum(np.asarray(mm[p][q], np.float64) * np.asarray(dm[p][q], np.float64)))
        for p in range(a)
        for q in range(a)
    )
    assert abs(lhs - rhs) <= 1e-5 * max(abs(lhs), 1.0)


@needs_compiler
@pytest.mark.parametrize("method", ["w2", "w4"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 4, 5), (1, 7, 5, 3, 6), (2, 16, 16, 64, 64)])
def test_conv_and_gradients_same_with_and_without_kernels(shape, method, monkeypatch):
    n, h, w, cin, cout = shape
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)).astype(np.float32))
    k = jnp.asarray((rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32))
    g = jnp.asarray(rng.standard_normal((n, h, w, cout)).astype(np.float32))
    plan = (method,) * 3
    tol = {"w2": 2e-6, "w4": 2e-5}[method]  # test_conv.py's tolerances against lax.conv

    def run():  # the output and both gradients of one convolution, for output gradient g
        y, vjp = jax.vjp(lambda x, k: conv.conv3x3(x, k, plan), x, k)
        return (y,) + vjp(g)

    with_ffi = jax.jit(run)()
    monkeypatch.setattr(conv, "_ffi_transforms", lambda m, dtype: False)
    without = jax.jit(run)()
    # independent truth: XLA's conv and its autodiff
    y, vjp = jax.vjp(conv.xla_conv, x, k)
    ref = (y,) + vjp(g)
    for a, b, r in zip(with_ffi, without, ref):
        a, b, r = (np.asarray(v, np.float64) for v in (a, b, r))
        # same maths up to XLA's choice of fusing what surrounds the transforms
        assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
        assert np.abs(a - r).max() <= tol * np.abs(r).max()


@needs_compiler
def test_program_uses_the_custom_calls():
    x, k = _x((1, 8, 8, 4)), _x((3, 3, 4, 4), 1)
    hlo = jax.jit(lambda x, k: conv.winograd_conv(x, k, 2)).lower(x, k).as_text()
    for target in ("input", "output", "filter"):
        assert f"ddpm_wino2_{target}" in hlo
    for m, method in ((2, "w2"), (4, "w4")):
        f = lambda x, k: jnp.sum(conv.conv3x3(x, k, (method,) * 3))  # noqa: E731
        hlo = jax.jit(jax.grad(f, (0, 1))).lower(x, k).as_text()
        for target in ("input", "output", "filter", "dm", "filter_grad"):
            assert f"ddpm_wino{m}_{target}" in hlo


_FALLBACK = """
import jax, jax.numpy as jnp, numpy as np
from diffusion.models import conv, winograd_ffi
print("REASON", winograd_ffi.unavailable_reason())
assert not winograd_ffi.available()
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((1, 7, 6, 3)).astype(np.float32))
k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
hlo = jax.jit(lambda x, k: conv.winograd_conv(x, k, 2)).lower(x, k).as_text()
assert "ddpm_wino2" not in hlo
y = conv.winograd_conv(x, k, 2)
ref = conv.xla_conv(x, k)
err = float(jnp.abs(y - ref).max() / jnp.abs(ref).max())
assert err < 2e-6, err
print("OK")
"""


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"CXX": "/bin/false"}, "failed"),  # a compiler that fails: the build error is kept
        ({"DDPM_CPU_KERNELS": "0"}, "DDPM_CPU_KERNELS=0"),  # the off switch
    ],
)
def test_falls_back_to_the_jax_transforms(env, reason, tmp_path):
    full = dict(os.environ, DDPM_CACHE_DIR=str(tmp_path), JAX_PLATFORMS="cpu", **env)
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK], env=full, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    assert reason in proc.stdout
    assert not list(tmp_path.glob("**/*.so"))  # nothing half-built left in the cache
