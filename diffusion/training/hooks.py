"""What the training loop does between steps: log, checkpoint, draw the sample grid.

Each hook has a ``due`` rule (a pure function of the step, testable alone) and a call that acts
when due. They share one `PendingMetrics`: the device metrics since the last host sync, fetched
only when a hook needs them (at most once per ``log_every`` / checkpoint / grid step), so the
host never waits on the device in between. Every write to the workdir goes through `storage_op`,
so a storage failure is one `io.StorageError` naming the last good checkpoint step.
"""

from __future__ import annotations

import json
import logging
import signal
from typing import Callable, List, Optional

import jax
import numpy as np

from diffusion import cpu_runtime, io, samplers, sampling
from diffusion.checkpoint import CheckpointSaveError, storage_problem
from diffusion.factories import config_to_dict, make_denoise_fn, parameterization

__all__ = [
    "NonFiniteError",
    "Preemption",
    "PendingMetrics",
    "MetricsLogger",
    "CheckpointHook",
    "GridHook",
    "storage_op",
    "grid_sampler",
    "nanmean",
]


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


class Preemption:
    """Turns SIGTERM / SIGINT into a flag the loop polls: save, then exit cleanly. A second
    signal raises `KeyboardInterrupt` at once (stop without saving)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: rely on Orbax's preemption check only
                pass
        return self

    def _handler(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt  # a second signal: stop now, without saving
        self.signal = signum
        logging.warning(
            "Received %s: saving a checkpoint at the current step, then exiting.",
            signal.Signals(signum).name,
        )

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def storage_op(what: str, path: str, last_good: Callable[[], object], fn: Callable[[], None]):
    """Runs ``fn`` (a write of ``path`` in the workdir, described by ``what``); a failure becomes
    one `io.StorageError` naming the operation, the path (and bucket), the last good checkpoint
    step and the fix, instead of the client library's traceback."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - classified into one message
        kind, fix = storage_problem(e)
        text = " ".join(str(e).split())[:300]
        good = last_good()
        raise io.StorageError(
            f"Storage failed while {what} ({path}; {kind}; {type(e).__name__}: {text}). "
            + (
                f"The last good checkpoint is step {good}"
                if good is not None
                else "No checkpoint was saved yet"
            )
            + f". Fix: {fix}, then relaunch the same command to resume."
        ) from e


def nanmean(values) -> float:
    """Mean ignoring NaN (an empty t-quartile in a small batch); NaN if all are NaN."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


class PendingMetrics:
    """The metrics dicts of the steps dispatched since the last host sync.

    ``flush(step)`` fetches them (one `jax.device_get`) and, with ``nonfinite='raise'``, raises
    `NonFiniteError` naming the first non-finite step (``step`` is the newest one), the last
    saved step (``last_saved``: the start step, then kept current by `CheckpointHook`) and
    ``ckpt_dir``. Returns the fetched list, or None if empty.
    """

    def __init__(self, nonfinite: str, last_saved: int, ckpt_dir: str):
        self.nonfinite = nonfinite
        self.last_saved = last_saved
        self.ckpt_dir = ckpt_dir
        self.items: List[dict] = []

    def append(self, metrics) -> None:
        self.items.append(metrics)

    def flush(self, step: int) -> Optional[List[dict]]:
        if not self.items:
            return None
        got = jax.device_get(self.items)
        self.items = []
        for i, m in enumerate(got):
            if m["finite"] < 1 and self.nonfinite == "raise":
                bad_step = step - len(got) + i + 1
                what = "loss" if not np.isfinite(m["loss"]) else "gradient norm"
                raise NonFiniteError(
                    f"Non-finite {what} at step {bad_step} (loss={m['loss']}, grad_norm="
                    f"{m['grad_norm']}). The state was not saved; the last good checkpoint is step "
                    f"{self.last_saved} in {self.ckpt_dir}. Lower --config.training.lr, check "
                    "the data, or set --config.training.nonfinite=skip."
                )
        return got


class MetricsLogger:
    """Every ``every`` steps and at the last step: the mean of each metric over the steps since
    the last log (NaN-ignoring), plus ``skipped_steps`` (non-finite steps), to ``writer`` and, if
    ``metrics_path`` is set (the main process), one JSON line in ``metrics.jsonl``."""

    def __init__(
        self,
        every: int,
        num_steps: int,
        pending: PendingMetrics,
        writer,
        metrics_path: Optional[str],
        last_good: Callable[[], object],
    ):
        self.every, self.num_steps = every, num_steps
        self.pending, self.writer = pending, writer
        self.metrics_path, self.last_good = metrics_path, last_good

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.num_steps

    def __call__(self, step: int) -> None:
        if not self.due(step):
            return
        got = self.pending.flush(step)
        scalars = {k: nanmean([m[k] for m in got]) for k in got[-1]}
        scalars["skipped_steps"] = float(sum(1 - m["finite"] for m in got))
        self.writer.write_scalars(step, scalars)
        if self.metrics_path:
            path, line = self.metrics_path, json.dumps({"step": step, **scalars})
            storage_op(
                f"appending step {step}'s metrics",
                path,
                self.last_good,
                lambda: io.append_line(path, line),
            )

    def close(self) -> None:
        self.writer.flush()


class CheckpointHook:
    """Saves the state every ``checkpoint_every`` and ``keep_every`` steps, at the last step and
    when preempted; never a state that went non-finite (the pending metrics are checked first).
    ``last_saved`` is the newest step saved by this run (the start step before the first); it is
    also set on ``pending`` for its error message (a one-way reference: the hooks form no
    reference cycle, so the checkpointer is freed as soon as the loop ends)."""

    def __init__(
        self,
        ckpt,
        config,
        pending: PendingMetrics,
        start: int,
    ):
        tr = config.training
        self.ckpt, self.pending = ckpt, pending
        self.every, self.keep_every, self.num_steps = (
            tr.checkpoint_every,
            tr.keep_every,
            tr.num_train_steps,
        )
        self.config_dict = config_to_dict(config)
        self.last_saved = start

    def due(self, step: int, preempted: bool = False) -> bool:
        return (
            step % self.every == 0
            or step % self.keep_every == 0
            or step == self.num_steps
            or preempted
        )

    def __call__(self, step: int, state, preempted: bool = False) -> None:
        if self.due(step, preempted):
            self.save(step, state)

    def save(self, step: int, state) -> None:
        self.pending.flush(step)  # never save a state that went non-finite
        try:
            self.ckpt.save(step, state, self.config_dict)
        except CheckpointSaveError:
            raise  # names the step, the last good one and the fix already
        except OSError as e:
            raise OSError(
                f"Could not save the checkpoint at step {step} in {self.ckpt.directory} "
                f"({e}). The last good checkpoint, step {self.last_saved}, is untouched; free "
                "space or fix the workdir, then relaunch to resume from it."
            ) from e
        self.last_saved = self.pending.last_saved = step


def grid_sampler(config, model, schedule) -> Callable:
    """``(ema_params, key) -> uint8 [N, H, W, C]``: the training-time grid drawn with
    `samplers.grid_spec_from_config` (``config.sample`` with ``training.grid_sample``'s fields in
    place of its own; x̂_0 clipped by default, as in the released code's sample summaries)."""
    tr = config.training
    param = parameterization(config)
    spec = samplers.grid_spec_from_config(config)
    shape = (
        tr.num_grid_samples,
        config.data.image_size,
        config.data.image_size,
        config.data.channels,
    )

    @jax.jit
    def sample(params, key):
        out = samplers.draw(spec, schedule, make_denoise_fn(model, params), shape, key, param)
        return sampling.to_uint8(out.x)

    return lambda params, key: np.asarray(jax.device_get(sample(params, key)))


class GridHook:
    """Every ``every`` steps and at the last step: draws the EMA sample grid from the same
    ``key`` every time (``make_sampler()`` is called once, at the first grid) and, if
    ``samples_dir`` is set (the main process), writes ``samples/step_<8 digits>.png`` (and its 4x
    enlargement ``step_<8 digits>_x4.png``, `io.save_sample_grid`) and the first 16 images to
    ``writer``."""

    def __init__(
        self,
        every: int,
        num_steps: int,
        pending: PendingMetrics,
        make_sampler: Callable[[], Callable],
        key,
        samples_dir: Optional[str],
        writer,
        last_good: Callable[[], object],
    ):
        self.every, self.num_steps = every, num_steps
        self.pending, self.make_sampler, self.key = pending, make_sampler, key
        self.samples_dir, self.writer, self.last_good = samples_dir, writer, last_good
        self.sampler = None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.num_steps

    def __call__(self, step: int, state) -> None:
        if not self.due(step):
            return
        self.pending.flush(step)
        # With DDPM_KEEP_FREED_MEMORY the heap keeps the step's ~2 GB of freed
        # temporaries (CIFAR10 b32); compiling and running the sampler on top of it
        # would add its own. Give it back first (the next step faults it in once).
        cpu_runtime.release_free_heap()
        self.sampler = self.sampler or self.make_sampler()
        images = self.sampler(state.ema_params, self.key)  # same noise every time
        if self.samples_dir:
            path = io.join(self.samples_dir, f"step_{step:08d}.png")
            storage_op(
                f"writing step {step}'s sample grid",
                path,
                self.last_good,
                lambda: io.save_sample_grid(images, path),
            )
            self.writer.write_images(step, {"ema_samples": images[:16]})
