"""Entry point: ``python launch.py --config experiments/mnist5k.py --workdir DIR [--mode ...]``.

Modes: ``train`` (train, resuming from the workdir's newest good checkpoint), ``evaluate``
(samples → FID/KID, bits/dim; resumable), ``sample`` (a sample grid from the EMA parameters),
``train_and_evaluate`` (train, then evaluate). Any config field can be overridden:
``--config.training.batch_size=64``. Multi-host: on a TPU pod slice nothing extra is needed; for
several GPU hosts or CPU processes pass --coordinator_address/--num_processes/--process_id.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "ml_collections config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "evaluate", "sample", "train_and_evaluate"], "What to run."
)
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from diffusion import cpu_runtime, quiet_logs

    quiet_logs.install()
    cpu_runtime.apply_xla_cpu_flags()  # before JAX starts its backend
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # DIFFUSION_KEEP_FREED_MEMORY (cpu_runtime.keep_freed_memory); unset: sync for a process
    # that only trains (1.14-1.30x steps/s at the same peak RSS), glibc's defaults for one that
    # samples or evaluates (slower and larger under sync; benchmarks/RESULTS.md §23).
    heap_default = "sync" if _MODE.value == "train" else "0"
    try:
        heap_mode = cpu_runtime.keep_freed_memory_mode(default=heap_default)
    except ValueError as e:  # a typo in the variable: say so before anything starts
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    heap_kept = cpu_runtime.keep_freed_memory(default=heap_default)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # tf.data only: keep TF off the accelerators
    import jax

    from diffusion import parallel

    parallel.maybe_initialize_distributed(
        coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value
    )
    logging.info(
        "JAX process %d/%d, %d local / %d global devices (%s); %s=%s (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
        cpu_runtime.KEEP_FREED_MEMORY_ENV,
        heap_mode,
        "applied" if heap_kept else "glibc defaults" if heap_mode == "0" else "not applied",
    )
    from diffusion import checkpoint, train
    from diffusion.config_check import ConfigError

    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except (
        ConfigError,
        train.NonFiniteError,
        checkpoint.CheckpointIncompatibleError,
        checkpoint.NoRestorableCheckpointError,
        FileNotFoundError,
        OSError,
    ) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(config, workdir: str, mode: str) -> None:
    """Runs ``mode`` on ``config`` in ``workdir``; a preempted training run does not evaluate.
    Ends with the wall time of each stage and where the outputs are."""
    import time

    import numpy as np

    from diffusion import train
    from diffusion.progress import format_seconds

    stages, t0 = [], time.time()
    if mode in ("train", "train_and_evaluate"):
        state = train.train_and_evaluate(config, workdir)
        stages.append(("training (incl. data, compile, checkpoints, grids)", time.time() - t0))
        reached = int(np.asarray(state.step.addressable_data(0)))
        if reached < config.training.num_train_steps:
            logging.warning(
                "Training stopped at step %d of %d (preempted); exiting without "
                "evaluating. Relaunch the same command to resume.",
                reached,
                config.training.num_train_steps,
            )
            return
    if mode in ("evaluate", "train_and_evaluate", "sample"):
        from diffusion import evaluate

        t1 = time.time()
        evaluate.run(config, workdir, mode="sample" if mode == "sample" else "evaluate")
        stages.append(("sampling" if mode == "sample" else "evaluation", time.time() - t1))
    logging.info(
        "Done in %s: %s. Outputs in %s: checkpoints/, samples/step_*.png (training "
        "grids), eval/ (results.json, sample grids), metrics.jsonl, TensorBoard events.",
        format_seconds(time.time() - t0),
        "; ".join(f"{k} {format_seconds(v)}" for k, v in stages),
        workdir,
    )


if __name__ == "__main__":
    app.run(main)
