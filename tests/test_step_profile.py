"""The step profiler's HLO reading (`benchmarks.step_profile`): convolutions found in the
optimized HLO are classified (3×3 forward/backward-input vs backward-filter) and their FLOPs
match the closed form 2·B·H·W·C_in·C_out·9 of each of a conv layer's three convolutions."""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.step_profile import hlo_op_kinds


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_conv_kinds_and_flops_of_a_conv_layer_forward_and_backward():
    B, H, cin, cout = 2, 8, 4, 6
    x = jnp.ones((B, H, H, cin), jnp.float32)
    w = jnp.ones((3, 3, cin, cout), jnp.float32)

    def loss(x, w):
        return jnp.sum(jnp.sin(_conv(x, w)))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    kinds = hlo_op_kinds(compiled.as_text())
    convs = [(k, f) for k, f in kinds.values() if k.startswith("conv")]
    one = 2.0 * B * H * H * cin * cout * 9
    by_kind = {}
    for k, f in convs:
        by_kind.setdefault(k, []).append(f)
    # forward + backward-input are 3×3 windows; the filter gradient contracts over the image.
    assert sorted(by_kind) == ["conv 3x3", "conv wgrad"], by_kind
    np.testing.assert_allclose(sorted(by_kind["conv 3x3"]), [one, one])
    np.testing.assert_allclose(by_kind["conv wgrad"], [one])


def test_non_conv_ops_are_classified_by_what_they_hold():
    a = jnp.ones((16, 32), jnp.float32)
    b = jnp.ones((32, 8), jnp.float32)
    compiled = jax.jit(lambda a, b: jnp.tanh(a @ b).sum()).lower(a, b).compile()
    kinds = {k for k, _ in hlo_op_kinds(compiled.as_text()).values()}
    assert "dot" in kinds
    assert not any(k.startswith("conv") for k in kinds)
