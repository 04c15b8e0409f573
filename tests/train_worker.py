"""Runs a short real training of a tiny config in its own process and dumps the result.

Used by tests/test_train.py to compare 1 device, N CPU devices and several jax.distributed
processes (gloo collectives on 127.0.0.1). Device flags must be set before JAX is imported,
hence a separate process.

    python tests/train_worker.py --workdir W --data_dir D --steps 4 --devices 4 --out result.npz
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_config(data_dir: str, steps: int, batch_size: int = 8):
    """tiny.py shrunk further (16x16 inputs, one level pair) so that compiling takes seconds."""
    from experiments import tiny

    config = tiny.get_config()
    config.data.data_dir = data_dir
    config.data.image_size = 16
    config.model.ch_mult = (1, 2)
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.1
    config.training.batch_size = batch_size
    config.training.num_train_steps = steps
    config.training.log_every = 1
    config.training.checkpoint_every = steps
    config.training.keep_every = steps
    config.training.sample_every = 10**9
    return config


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--process_id", type=int, default=None)
    ap.add_argument("--num_processes", type=int, default=None)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint_every", type=int, default=None)
    ap.add_argument(
        "--heartbeat", type=int, default=None, help="jax.distributed heartbeat timeout (s)"
    )
    ap.add_argument(
        "--step_delay",
        type=float,
        default=0.0,
        help="sleep this long after each step (gives fault-injection tests time to act)",
    )
    ap.add_argument(
        "--device_delay",
        type=int,
        default=0,
        help="append this many 512x512 matmuls to each step, on the device and "
        "asynchronously (a step that is slow the way a big model's is)",
    )
    ap.add_argument(
        "--compile_delay",
        type=float,
        default=0.0,
        help="sleep this long before compiling the train step (a process that compiles slower "
        "than its peers, as on a loaded machine)",
    )
    ap.add_argument("--log_every", type=int, default=1)
    ap.add_argument(
        "--mode",
        default="train",
        choices=["train", "train_and_evaluate"],
        help="train_and_evaluate goes through launch.run (evaluates unless preempted)",
    )
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname).1s %(module)s] %(message)s"
    )
    import jax

    # (tests/conftest.py sets JAX_COMPILATION_CACHE_DIR, which this process inherits)
    import numpy as np

    from diffusion import parallel, training
    from diffusion.training import step as step_lib  # the loop builds its step from here

    if args.coordinator:
        parallel.maybe_initialize_distributed(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=120,
            heartbeat_timeout_seconds=args.heartbeat,
        )
    config = small_config(args.data_dir, args.steps)
    if args.checkpoint_every:
        config.training.checkpoint_every = args.checkpoint_every
    config.training.log_every = args.log_every
    if args.device_delay:
        import jax.numpy as jnp

        make_step_ = step_lib.make_train_step

        def burning_make_train_step(*a, **k):
            step = make_step_(*a, **k)

            def burn(state, metrics):
                w = jnp.eye(512, dtype=jnp.float32) * 0.5
                x = jnp.ones((512, 512), jnp.float32) * state.step.astype(jnp.float32)
                y = jax.lax.fori_loop(0, args.device_delay, lambda i, a: jnp.tanh(a @ w), x)
                return state.replace(step=state.step + (0 * y[0, 0]).astype(jnp.int32)), metrics

            # One jitted program (so the loop compiles it ahead, like the real step).
            return jax.jit(lambda *args_: burn(*step(*args_)), donate_argnums=(0,))

        step_lib.make_train_step = burning_make_train_step
    if args.compile_delay:
        import time

        make_step_c = step_lib.make_train_step

        class _SlowToCompile:
            def __init__(self, step):
                self.step = step

            def lower(self, *a, **k):
                time.sleep(args.compile_delay)
                return self.step.lower(*a, **k)

        step_lib.make_train_step = lambda *a, **k: _SlowToCompile(make_step_c(*a, **k))
    if args.step_delay:
        import time

        make_step = step_lib.make_train_step

        def slow_make_train_step(*a, **k):
            step = make_step(*a, **k)

            def slow_step(*args_, **kw):
                out = step(*args_, **kw)
                jax.block_until_ready(out)
                time.sleep(args.step_delay)
                return out

            return slow_step

        step_lib.make_train_step = slow_make_train_step
    if args.mode == "train_and_evaluate":
        import launch

        launch.run(config, args.workdir, "train_and_evaluate")
        return
    state = training.train(config, args.workdir)
    local = lambda x: np.asarray(x.addressable_data(0))
    leaves = [local(x) for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state))]
    out = {f"leaf_{i:04d}": v for i, v in enumerate(leaves)}
    out["step"] = local(state.step)
    out["devices"] = np.array(jax.device_count())
    out["processes"] = np.array(jax.process_count())
    if jax.process_index() == 0:
        with open(os.path.join(args.workdir, "metrics.jsonl")) as f:
            out["losses"] = np.array([json.loads(line)["loss"] for line in f])
    path = args.out
    if jax.process_count() > 1:
        path = path[: -len(".npz")] + f"_p{jax.process_index()}.npz"
    np.savez(path, **out)


if __name__ == "__main__":
    main()
