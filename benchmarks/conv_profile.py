"""Where the train step's time goes: the U-Net's dominant layer, a 3×3 conv, alone (a profile
aid, not a test).

For the CIFAR10 U-Net's conv shapes at a given batch, times under ``jax.jit`` (XLA CPU, with
the XLA_FLAGS in effect) and in PyTorch (if installed, same thread count):
  fwd   y = conv(x, w)
  bwd   dL/dx and dL/dw of sum(y * g)  (the backward-input and backward-filter convolutions)
and prints GFLOP/s (2·B·H·W·Cin·Cout·9 per conv; bwd counts 2 convs) next to a jitted fp32 matmul.

``--wgrad`` times the filter gradient dL/dw alone, the step's slowest kind of op
(`benchmarks.step_profile`), in three JAX formulations and in PyTorch:
  xla     jax.grad of the conv w.r.t. w (XLA's backward-filter convolution)
  taps    9 dots, one per kernel tap: x[:, i:i+H, j:j+W, :]^T · g over (B, H, W)
  im2col  one GEMM: [B·H·W, 9·Cin]^T · [B·H·W, Cout] on the concatenated shifted inputs
  torch   torch.nn.grad.conv2d_weight (oneDNN's backward-weights kernel)
The three JAX forms are checked to agree before they are timed.

    python -m benchmarks.conv_profile --batch 32 --repeats 5
    python -m benchmarks.conv_profile --batch 32 --wgrad
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHAPES = ((32, 128, 128), (16, 256, 256), (8, 256, 256), (32, 256, 128))  # (H=W, Cin, Cout)


def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _jax_inputs(B, H, cin, cout):
    """Random x [B, H, H, Cin], w [3, 3, Cin, Cout] and output gradient g [B, H, H, Cout]."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.standard_normal((B, H, H, cin), np.float32)),
        jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.05),
        jnp.asarray(rng.standard_normal((B, H, H, cout), np.float32)),
    )


def _conv(x, w):
    """The U-Net's 3×3 'SAME' convolution, NHWC × HWIO → NHWC."""
    import jax

    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def jax_times(B, H, cin, cout, repeats):
    import jax
    import jax.numpy as jnp

    x, w, g = _jax_inputs(B, H, cin, cout)

    fwd = jax.jit(_conv)
    bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv(x, w) * g), argnums=(0, 1)))
    return (
        _median_time(lambda: fwd(x, w).block_until_ready(), repeats),
        _median_time(lambda: jax.block_until_ready(bwd(x, w)), repeats),
    )


def torch_times(B, H, cin, cout, repeats):
    import torch

    x = torch.randn(B, cin, H, H)
    w = torch.randn(cout, cin, 3, 3) * 0.05
    g = torch.randn(B, cout, H, H)
    conv = torch.nn.functional.conv2d

    def fwd():
        with torch.no_grad():
            conv(x, w, padding=1)

    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

    def bwd():
        y = conv(xr, wr, padding=1)
        torch.autograd.grad((y * g).sum(), (xr, wr))

    return _median_time(fwd, repeats), _median_time(bwd, repeats)


def wgrad_times(B, H, cin, cout, repeats, have_torch):
    """Median seconds of the filter gradient in each formulation (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x, w, g = _jax_inputs(B, H, cin, cout)

    def shifted(x):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [xp[:, i : i + H, j : j + H, :] for i in range(3) for j in range(3)]

    def taps(x, g):
        g2 = g.reshape(-1, cout)
        return jnp.stack([s.reshape(-1, cin).T @ g2 for s in shifted(x)]).reshape(3, 3, cin, cout)

    def im2col(x, g):
        patches = jnp.concatenate(shifted(x), axis=-1).reshape(-1, 9 * cin)
        return (patches.T @ g.reshape(-1, cout)).reshape(3, 3, cin, cout)

    fns = {
        "xla": jax.jit(jax.grad(lambda w, x, g: jnp.sum(_conv(x, w) * g))),
        "taps": jax.jit(lambda w, x, g: taps(x, g)),
        "im2col": jax.jit(lambda w, x, g: im2col(x, g)),
    }
    ref = np.asarray(fns["xla"](w, x, g))
    out = {}
    for name, fn in fns.items():
        np.testing.assert_allclose(
            np.asarray(fn(w, x, g)), ref, rtol=1e-3, atol=1e-2 * np.abs(ref).max()
        )
        out[name] = _median_time(lambda: fn(w, x, g).block_until_ready(), repeats)
    if have_torch:
        import torch

        xt, gt = torch.randn(B, cin, H, H), torch.randn(B, cout, H, H)
        out["torch"] = _median_time(
            lambda: torch.nn.grad.conv2d_weight(xt, (cout, cin, 3, 3), gt, padding=1), repeats
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--wgrad", action="store_true", help="time the filter gradient's formulations")
    a = p.parse_args(argv)
    from diffusion import cpu_runtime

    cpu_runtime.apply_xla_cpu_flags()
    cpu_runtime.keep_freed_memory()  # DDPM_KEEP_FREED_MEMORY (unset: 0)
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
        have_torch = True
    except ImportError:
        have_torch = False
    from benchmarks.common import matmul_peak

    peak = matmul_peak([1024, 2048], a.repeats)["peak_flops"]
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}")
    print(f"jitted fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; batch {a.batch}")
    if a.wgrad:
        names = ("xla", "taps", "im2col", "torch")
        print(
            f"filter gradient dL/dw alone\n{'H, Cin->Cout':>16} | "
            + " | ".join(f"{n:>14}" for n in names)
        )
        for H, cin, cout in SHAPES:
            flops = 2.0 * a.batch * H * H * cin * cout * 9
            t = wgrad_times(a.batch, H, cin, cout, a.repeats, have_torch)
            cells = [
                f"{t[n] * 1e3:6.1f} ms {flops / t[n] / 1e9:4.0f}G" if n in t else f"{'n/a':>14}"
                for n in names
            ]
            print(f"{H:>4}, {cin:>4}->{cout:<4} | " + " | ".join(cells))
        return 0
    print(
        f"{'H, Cin->Cout':>16} | {'jax fwd':>14} | {'torch fwd':>14} | {'jax fwd+bwd':>14} | "
        f"{'torch bwd':>14}"
    )
    for H, cin, cout in SHAPES:
        flops = 2.0 * a.batch * H * H * cin * cout * 9
        jf, jb = jax_times(a.batch, H, cin, cout, a.repeats)
        tf_, tb = torch_times(a.batch, H, cin, cout, a.repeats) if have_torch else (None, None)

        def cell(t, n):
            return f"{t * 1e3:6.1f} ms {n * flops / t / 1e9:4.0f}G" if t else f"{'n/a':>14}"

        print(
            f"{H:>4}, {cin:>4}->{cout:<4} | {cell(jf, 1)} | {cell(tf_, 1)} | {cell(jb, 2)} | "
            f"{cell(tb, 2)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
