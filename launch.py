"""Entry point: ``python launch.py --config experiments/mnist5k.py --workdir DIR [--mode ...]``.

Modes: ``train`` (train, resuming from the workdir's newest good checkpoint), ``evaluate``
(samples → FID/KID, bits/dim; resumable), ``sample`` (a sample grid from the EMA parameters),
``train_and_evaluate`` (train, then evaluate). Any config field can be overridden:
``--config.training.batch_size=64``. Multi-host: on a TPU pod slice nothing extra is needed; for
several GPU hosts or CPU processes pass --coordinator_address/--num_processes/--process_id.
"""

import logging
import os
import re
import sys
import tempfile
import traceback

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
    # DDPM_KEEP_FREED_MEMORY (cpu_runtime.keep_freed_memory); unset: sync for a process
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
    _log_kernels(_CONFIG.value)
    try:
        run(_CONFIG.value, _WORKDIR.value, _MODE.value)
    except Exception as e:  # noqa: BLE001 - every failure ends as one message, never a traceback
        message, status = error_message(e)
        logging.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        _exit_now(status)
    except KeyboardInterrupt:  # a second SIGTERM / Ctrl-C: stop now, without saving
        message = (
            "interrupted (a second SIGTERM or Ctrl-C): stopped without saving; relaunch the same "
            "command to resume from the last good checkpoint"
        )
        logging.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        _exit_now(130)


def _log_kernels(config) -> str:
    """Logs `diffusion.models.cpu_kernels.status_line` for the run's compute dtype and
    ``config.runtime.conv_impl`` (which kernels run: C++ custom calls, the pure-JAX fallback,
    XLA's; and if not the C++ ones, why), as a warning when the fallback runs. Builds the
    kernels on the CPU backend if needed. Returns the line."""
    from diffusion.models import cpu_kernels

    runtime = config.get("runtime") or {}
    line = cpu_kernels.status_line(
        config.model.get("dtype", "float32"), runtime.get("conv_impl", "auto")
    )
    fallback = line.startswith(cpu_kernels.FALLBACK)
    logging.log(logging.WARNING if fallback else logging.INFO, "%s", line)
    return line


def error_message(e: BaseException):
    """``(message, exit status)`` for an exception that ended a run.

    The project's own errors (bad config, non-finite loss, checkpoint and storage failures) carry
    a message with the fix and give status 2. Storage errors of the libraries (TensorStore's
    ``ValueError`` with an absl status code, gcsfs' and OS errors) are classified (no space,
    permission, not found, unavailable) into one line with the fix, status 2. Anything else is
    ``Type: text`` on one line with status 1; its traceback goes to a file the message names.
    """
    from diffusion import checkpoint, io, training
    from diffusion.config_check import ConfigError

    ours = (
        ConfigError,
        io.StorageError,
        training.NonFiniteError,
        checkpoint.CheckpointIncompatibleError,
        checkpoint.NoRestorableCheckpointError,
        checkpoint.CheckpointSaveError,
        checkpoint.CheckpointReadError,
    )
    if isinstance(e, ours):
        return str(e), 2
    text = " ".join(str(e).split())
    if len(text) > 500:
        text = text[:497] + "..."
    kind, fix = checkpoint.storage_problem(e)
    if isinstance(e, OSError) or kind != "error":
        if isinstance(e, OSError) and kind == "error":
            return f"{type(e).__name__}: {text}", 2
        return f"storage: {kind} ({type(e).__name__}: {text}). Fix: {fix}.", 2
    return f"{type(e).__name__}: {text} (traceback in {_save_traceback(e)})", 1


def _save_traceback(e: BaseException) -> str:
    """Writes ``e``'s traceback to a local temporary file; returns its path."""
    fd, path = tempfile.mkstemp(prefix="ddpm-jax-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    return path


def _exit_now(status: int) -> None:
    """Ends the process with ``status`` after flushing the logs, without waiting for other
    threads: a checkpoint writer blocked on unreachable storage would otherwise hold the
    interpreter's exit forever (and Orbax's background threads print tracebacks as it stops)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def parse_flags(argv):
    """absl's flag parsing, with one-line errors for the config: a missing ``--config`` file
    (named, before anything heavy is imported), a config that fails to load, and an unknown
    ``--config.a.b=...`` field (with ml_collections' "did you mean" suggestion). Exit status 2."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        _usage_error(
            f"--config {path!r}: no such file (relative to {os.getcwd()}). Give the path of a "
            "config file, e.g. --config experiments/mnist5k.py."
        )
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _usage_error(" ".join(str(e).split()))
    except (AttributeError, KeyError) as e:  # an override names a field the config lacks
        _usage_error(_override_message(e, argv))
    except Exception as e:  # noqa: BLE001 - the config file itself fails to load (syntax ...)
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        detail = " ".join(str(e).split())
        _usage_error(f"--config {path!r} could not be loaded{where}: {type(e).__name__}: {detail}")
    try:
        _ = _CONFIG.value  # loads the file now: its errors are reported before start-up
    except Exception as e:  # noqa: BLE001 - the file's own error, on one line
        cause = e.__cause__ or e
        detail = " ".join(str(cause).split())
        _usage_error(f"--config {path!r} could not be loaded: {type(cause).__name__}: {detail}")
    return rest


def _config_path(argv):
    """The file part of ``--config PATH[:ARGS]`` / ``--config=PATH[:ARGS]`` in ``argv``."""
    for i, a in enumerate(argv):
        if a in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1].split(":", 1)[0]
    return None


def _override_message(e: BaseException, argv) -> str:
    """One line for a failed ``--config.x.y=v`` override: the flag, the unknown field and the
    suggestion ml_collections made."""
    text = " ".join((str(e.args[0]) if e.args else str(e)).replace("\\", "").split())
    text = text.replace("\\n", " ").replace("\n", " ")
    named = re.search(r'instead of "(\w+)"', text) or re.search(r"'(\w+)'", text)
    key = named.group(1) if named else None

    def names_key(arg: str) -> bool:
        return bool(key) and re.search(rf"\.{re.escape(key)}(\.|$)", arg.split("=")[0]) is not None

    flag = next((a for a in argv if a.startswith("--config.") and names_key(a)), None)
    hint = re.search(r'Did you mean "(\w+)"', text)
    return (
        (f"{flag}: " if flag else "")
        + (f"unknown config field {key!r}" if key else f"bad config override ({text})")
        + (f"; did you mean {hint.group(1)!r}?" if hint else ".")
        + " The fields are listed in experiments/default.py."
    )


def _usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run(config, workdir: str, mode: str) -> None:
    """Runs ``mode`` on ``config`` in ``workdir``; a preempted training run does not evaluate.
    Ends with the wall time of each stage and where the outputs are."""
    import time

    import numpy as np

    from diffusion import training
    from diffusion.progress import format_seconds

    stages, t0 = [], time.time()
    if mode in ("train", "train_and_evaluate"):
        state = training.train(config, workdir)
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
        "grids, with 4x copies *_x4.png), eval/ (results.json, sample grids and their _x4.png), "
        "metrics.jsonl, TensorBoard events.",
        format_seconds(time.time() - t0),
        "; ".join(f"{k} {format_seconds(v)}" for k, v in stages),
        workdir,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
