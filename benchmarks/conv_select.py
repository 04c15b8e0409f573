"""Per-layer-shape timing of the 3x3 convolution methods of `diffusion.models.conv`, per
direction, on the CIFAR10 U-Net's own conv shapes: the measurements behind ``conv_impl='auto'``.

For every distinct stride-1 3x3 conv of the U-Net (read from the jaxpr of the real model) at
batch ``--batch``, times under ``jax.jit`` (median of ``--repeats`` after one warm-up):
  fwd  y = conv(x, w)                       xla | w2 (Winograd F(2,3)) | w4 (F(4,3))
  dx   dL/dx (XLA's backward-input conv; Winograd: the flipped-kernel conv of dy)
  dw   dL/dw (XLA's backward-filter conv; Winograd: the transpose of the method w.r.t. w)
and the best method per direction; ``count`` is how many layers of the U-Net have that shape.
The last lines sum each plan over the whole network (count-weighted).

    python -m benchmarks.conv_select --batch 8 --repeats 3
    python -m benchmarks.conv_select --batch 8 --repeats 7 --forward_only   # the inference rule
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

METHODS = ("xla", "w2", "w4")


def unet_conv_shapes(batch: int, config_name: str = "cifar10"):
    """``Counter{(B, H, W, Cin, Cout): n}`` of the 3x3 stride-1 convs in the model's forward."""
    import importlib

    import jax
    import jax.numpy as jnp

    from diffusion import factories

    cfg = importlib.import_module(f"experiments.{config_name}").get_config()
    cfg.runtime.conv_impl = "xla"
    model = factories.create_model(cfg)
    s, c = cfg.data.image_size, cfg.data.channels
    x = jax.ShapeDtypeStruct((batch, s, s, c), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros(x.shape), jnp.zeros(t.shape, jnp.int32), train=False
        )
    )
    jaxpr = jax.make_jaxpr(lambda p, x, t: model.apply(p, x, t, train=False))(params, x, t)
    out = collections.Counter()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
                if tuple(eqn.params["window_strides"]) == (1, 1) and rhs.shape[:2] == (3, 3):
                    out[(lhs.shape[0], lhs.shape[1], lhs.shape[2], lhs.shape[3], rhs.shape[3])] += 1
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
                walk(sub)
            for v in eqn.params.values():
                if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                    walk(v.jaxpr)
                elif hasattr(v, "eqns"):
                    walk(v)

    walk(jaxpr.jaxpr)
    return out


def time_shape(B, H, W, cin, cout, repeats, directions=("fwd", "dx", "dw")):
    """``{direction: {method: seconds}}`` for one shape: every (direction, method) program
    compiled first, then ``repeats`` rounds that run each once in turn (so load changes hit all
    alike); min of rounds (the least disturbed run on a shared host)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from diffusion.models import conv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, H, W, cin), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.05)
    g = jnp.asarray(rng.standard_normal((B, H, W, cout), np.float32))
    make = {
        "fwd": lambda m: jax.jit(lambda x, w, g: conv._fwd_method(m, x, w)),
        "dx": lambda m: jax.jit(lambda x, w, g: conv._dx_method(m, g, w)),
        "dw": lambda m: jax.jit(lambda x, w, g: conv._wgrad_method(m, x, g, w)),
    }
    fns = {(d, m): make[d](m) for m in METHODS for d in directions}
    for f in fns.values():
        jax.block_until_ready(f(x, w, g))
    ts = {key: [] for key in fns}
    for _ in range(repeats):
        for key, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(x, w, g))
            ts[key].append(time.perf_counter() - t0)
    res = {d: {} for d in directions}
    for (d, m), t in ts.items():
        res[d][m] = min(t)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--config", default="cifar10")
    p.add_argument("--out", default=None, help="JSON file for the raw timings")
    p.add_argument(
        "--forward_only",
        action="store_true",
        help="time the forward only (what sampling/evaluation run: conv_impl='auto''s inference rule)",
    )
    a = p.parse_args(argv)
    from diffusion import cpu_runtime

    cpu_runtime.apply_xla_cpu_flags()
    cpu_runtime.keep_freed_memory()  # DDPM_KEEP_FREED_MEMORY (unset: 0)
    from benchmarks.common import matmul_peak

    dirs = ("fwd",) if a.forward_only else ("fwd", "dx", "dw")
    shapes = unet_conv_shapes(a.batch, a.config)
    peak = matmul_peak([1024], 3)["peak_flops"]
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}")
    print(
        f"jitted fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; batch {a.batch}; "
        f"{sum(shapes.values())} stride-1 3x3 convs in {len(shapes)} shapes"
    )
    hdr = (
        f"{'B,H,W,Cin->Cout':>20} | n | "
        + " | ".join(f"{d} {m:>3}" for d in dirs for m in METHODS)
        + f" | best {'/'.join(dirs)}"
    )
    print(hdr + "\n" + "-" * len(hdr))
    rows, totals = [], collections.defaultdict(float)
    for (B, H, W, cin, cout), n in sorted(shapes.items(), key=lambda kv: -kv[0][1]):
        t = time_shape(B, H, W, cin, cout, a.repeats, dirs)
        best = tuple(min(t[d], key=t[d].get) for d in dirs)
        rows.append({"shape": [B, H, W, cin, cout], "count": n, "times_s": t, "best": best})
        for d in dirs:
            for m in METHODS:
                totals[(d, m)] += n * t[d][m]
            totals[(d, "best")] += n * t[d][best[dirs.index(d)]]
        cells = " | ".join(f"{t[d][m] * 1e3:7.1f}" for d in dirs for m in METHODS)
        print(
            f"{B:>3},{H:>3},{W:>3},{cin:>4}->{cout:<4} | {n} | {cells} | {'/'.join(best)}",
            flush=True,
        )
    print(
        "network total (ms, count-weighted): "
        + ", ".join(
            f"{d} {m} {totals[(d, m)] * 1e3:.0f}" for d in dirs for m in METHODS + ("best",)
        )
    )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                {
                    "batch": a.batch,
                    "peak_flops": peak,
                    "rows": rows,
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
