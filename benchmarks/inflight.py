"""Throughput cost of bounding the train loop's steps in flight (preemption latency).

The loop in `diffusion.training.train` waits for the step before the one it just
dispatched, so that a SIGTERM is acted on within about one step. This measures what that costs:
the real compiled train step of a config, fed by its real input pipeline, run ``--steps`` times
(a) dispatching freely (the old loop) and (b) waiting on the step before last (the loop now),
alternating, ``--rounds`` times; prints steps/s of each and their ratio, with the fp32 matmul peak
of the hour for scale.

    python -m benchmarks.inflight [--config experiments/mnist5k.py] [--steps 40] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="experiments/mnist5k.py")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data_dir", default=None)
    args = ap.parse_args()

    from diffusion import cpu_runtime

    cpu_runtime.apply_xla_cpu_flags()
    cpu_runtime.keep_freed_memory()  # DDPM_KEEP_FREED_MEMORY (unset: 0)
    import importlib.util

    import jax

    spec = importlib.util.spec_from_file_location("cfg", args.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    if args.data_dir:
        config.data.data_dir = args.data_dir

    from benchmarks.common import matmul_peak
    from diffusion import factories, parallel, training
    from diffusion.data import create_input_pipeline

    mesh = parallel.make_mesh()
    model, schedule = factories.create_model(config), factories.schedule_from_config(config)
    tx = factories.make_optimizer(config)
    step_fn = training.make_train_step(config, model, schedule, tx, mesh)
    key = jax.jit(lambda: jax.random.key(0), out_shardings=parallel.replicated_sharding(mesh))()
    batches = create_input_pipeline(config).iterator(0)
    state = factories.init_state(config, model, tx, mesh)
    batch = parallel.global_batch_from_local(next(batches), mesh)
    t0 = time.time()
    compiled = step_fn.lower(state, batch, key).compile()
    print(f"compiled in {time.time() - t0:.1f}s; {args.steps} steps per measurement")
    state, m = compiled(state, batch, key)
    jax.block_until_ready(m)

    def run(bounded: bool) -> float:
        nonlocal state
        t = time.perf_counter()
        in_flight = None
        for _ in range(args.steps):
            b = parallel.global_batch_from_local(next(batches), mesh)
            state, metrics = compiled(state, b, key)
            if bounded and in_flight is not None:
                jax.block_until_ready(in_flight)
            in_flight = metrics
        jax.block_until_ready(state)
        return args.steps / (time.perf_counter() - t)

    free, bound = [], []
    for _ in range(args.rounds):
        free.append(run(False))
        bound.append(run(True))
    peak = matmul_peak()["peak_flops"] / 1e9
    f, b = float(np.median(free)), float(np.median(bound))
    print(f"fp32 matmul peak this hour: {peak:.1f} GFLOP/s")
    print(
        f"free dispatch        : {f:.3f} steps/s  (rounds: {', '.join(f'{x:.3f}' for x in free)})"
    )
    print(
        f"<= 1 step in flight  : {b:.3f} steps/s  (rounds: {', '.join(f'{x:.3f}' for x in bound)})"
    )
    print(f"ratio bounded / free : {b / f:.3f}")


if __name__ == "__main__":
    main()
