"""Forward-pass speed of the DDPM U-Net (the paper's CIFAR10 model by default).

Reports compile time (lower + XLA compile) separately from run time; run time is the median of
``--repeats`` timed calls after one warm-up call, each ended with ``block_until_ready``.

Usage::

    python benchmarks/unet_forward.py                      # CIFAR10 model, batch 8, fp32
    python benchmarks/unet_forward.py --batch 128 --dtype bfloat16 --train
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion.models import get_model  # noqa: E402

CIFAR10 = dict(
    name="ddpm_unet",
    ch=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    dropout=0.1,
    resamp_with_conv=True,
)


def main(argv=None) -> None:
    """Parses flags, builds the model, prints timings (one ``key: value`` per line)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls (>= 5)")
    parser.add_argument("--train", action="store_true", help="dropout on (train=True)")
    parser.add_argument("--remat", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")

    model = get_model(dict(CIFAR10, dtype=args.dtype), out_ch=3, runtime={"remat": args.remat})
    model.validate(args.image_size)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.image_size, args.image_size, 3))
    t = jax.random.randint(jax.random.PRNGKey(1), (args.batch,), 0, 1000)

    t0 = time.perf_counter()
    variables = jax.jit(lambda k: model.init(k, x[:1], t[:1], train=False))(jax.random.PRNGKey(2))
    jax.block_until_ready(variables)
    init_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(variables))

    fwd = jax.jit(lambda v, x, t, k: model.apply(v, x, t, train=args.train, rngs={"dropout": k}))
    key = jax.random.PRNGKey(3)
    t0 = time.perf_counter()
    compiled = fwd.lower(variables, x, t, key).compile()
    compile_s = time.perf_counter() - t0

    jax.block_until_ready(compiled(variables, x, t, key))  # warm-up
    times = []
    for i in range(args.repeats):
        k = jax.random.fold_in(key, i)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(variables, x, t, k))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()} "
        f"({jax.default_backend()}), jax {jax.__version__}, cpu_count {os.cpu_count()}"
    )
    print(
        f"model: CIFAR10 DDPM U-Net, params {n_params:,}, dtype {args.dtype}, "
        f"remat {args.remat}, train {args.train}"
    )
    print(f"input: batch {args.batch} x {args.image_size}x{args.image_size}x3")
    print(f"init_s (jit, incl. compile): {init_s:.2f}")
    print(f"compile_s (forward): {compile_s:.2f}")
    print(
        f"forward_s median of {args.repeats}: {med:.4f}  "
        f"(min {min(times):.4f}, max {max(times):.4f})"
    )
    print(f"images_per_s: {args.batch / med:.1f}")


if __name__ == "__main__":
    main()
