"""Peak memory (RSS) of a training step, measured in a fresh process per side.

    python -m benchmarks.rss_child ours --batch 32 --steps 3 [--threads N] [--conv_impl auto]
    python -m benchmarks.rss_child peer --batch 32 --steps 3 [--threads N]

Imports only its own side's framework (JAX for ``ours``, torch + diffusers for ``peer``), records
the RSS after those imports (the baseline), builds the model and train step, runs ``--steps``
steps, and prints one line ``RSS_RESULT {json}`` with ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
(as MiB) before and after. `benchmarks.run` launches it and parses that line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

PREFIX = "RSS_RESULT "


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("side", choices=("ours", "peer"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--conv_impl", default=None, help="ours: config.runtime.conv_impl (default: config's)"
    )
    args = p.parse_args(argv)

    from benchmarks.common import set_threads

    threads = set_threads(args.threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.side == "ours":
        from diffusion import cpu_runtime

        cpu_runtime.apply_xla_cpu_flags()  # as launch.py does (inherited from run.py anyway)
        cpu_runtime.keep_freed_memory(default="sync")  # as launch.py --mode train
        from benchmarks import ours_jax

        result = ours_jax.memory_child(args.batch, args.steps, args.conv_impl)
    else:
        from benchmarks import peer_diffusers

        result = peer_diffusers.memory_child(args.batch, args.steps, threads)
    result.update(side=args.side, threads=threads)
    print(PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
