"""The training loop: `train(config, workdir)` = set up → `restore_or_init` → `run_steps`.

`run_steps` dispatches the step (compiled ahead by `compile_step` on the first batch) with at most
one step in flight, polls the checkpointer after every step, and calls the hooks of
`diffusion.training.hooks` in a fixed order: progress report, `MetricsLogger`, `CheckpointHook`
(also on preemption), `GridHook`. SIGTERM / SIGINT save at the current step and end the loop
within about one step; a second signal stops at once. Randomness is stateless (the step's key is
``fold_in(key(seed), step)``, the data order a pure function of (seed, step)), so a resumed run
is bitwise the uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterator, NamedTuple, Tuple

import jax
import ml_collections

from diffusion import cpu_runtime, io, parallel, rng
from diffusion.checkpoint import Checkpointer, CheckpointSaveError
from diffusion.config_check import incompatible_fields, validate_config
from diffusion.factories import (
    TrainState,
    abstract_state,
    config_to_dict,
    create_model,
    init_state,
    make_optimizer,
    schedule_from_config,
)
from diffusion.training import step as step_lib
from diffusion.training import t_sampler
from diffusion.training.hooks import (
    CheckpointHook,
    GridHook,
    MetricsLogger,
    PendingMetrics,
    Preemption,
    grid_sampler,
    storage_op,
)
from diffusion.training.restore import restore_or_init

__all__ = ["train", "compile_step", "run_steps", "make_hooks", "Hooks"]


class Hooks(NamedTuple):
    """The loop's periodic actions, called in this order after every step."""

    report: Callable[[int], None]  # progress (steps/s, ETA); every step
    logger: MetricsLogger
    checkpoint: CheckpointHook
    grid: GridHook


def compile_step(train_step, state, batch, base_key, step: int) -> Callable:
    """Compiles ``train_step`` for these arguments ahead of the first dispatch (a step without
    ``.lower``, e.g. a wrapped one in a test, is used as is), then waits for every process (so
    the step's first collective is not what waits for the slowest compile) and gives the
    compiler's memory back (`cpu_runtime.release_compile_caches`)."""
    t_compile = time.time()
    logging.info(
        "Compiling the train step (once per launch; seconds for small "
        "models, a minute or more for the CIFAR10 U-Net on a CPU) ..."
    )
    compiled = (
        train_step.lower(state, batch, base_key).compile()
        if hasattr(train_step, "lower")
        else train_step
    )
    logging.info(
        "Compiled the train step in %.1f s; training from step %d.",
        time.time() - t_compile,
        step,
    )
    # Processes finish compiling at different times; the step's first
    # cross-process collective must not be what waits for the slowest one.
    parallel.wait_for_all_processes("train_step_compiled")
    # The compiler's freed memory stays in glibc's heap, where the step's
    # buffers cannot reuse it, and JAX's caches still hold the init program and
    # the step's traced forms: give both back (~0.9 GiB for the CIFAR10 model).
    cpu_runtime.release_compile_caches()
    return compiled


def run_steps(
    state: TrainState,
    train_step: Callable,
    batches: Iterator,
    base_key,
    *,
    start: int,
    num_steps: int,
    ckpt,
    pending: PendingMetrics,
    hooks: Hooks,
    to_global: Callable = lambda batch: batch,
) -> TrainState:
    """Runs steps ``start+1 .. num_steps`` (fewer when preempted) and returns the last state.

    Args:
      state: the state at step ``start`` (donated to the step).
      train_step: ``(state, batch, base_key) -> (state, metrics)``; compiled on the first batch.
      batches: local batches from step ``start`` on (closed at the end if it has ``close``).
      ckpt: the `Checkpointer`: ``poll()`` after every step (a failed or hung asynchronous save
        stops the run there), ``manager.reached_preemption``, and a bounded ``close`` at the end
        (``close_timeout_s`` after an error, cut short by a signal).
      pending: where each step's metrics go until a hook fetches them.
      hooks: see `Hooks`; ``hooks.logger.close()`` flushes the writer at the end.
      to_global: local batch → the global batch on the mesh.
    """
    compiled_step = None
    in_flight = None  # metrics of the step dispatched last
    failed = False  # the loop is ending by an exception
    with Preemption() as preempt:
        step = start
        try:
            while step < num_steps:
                batch = to_global(next(batches))
                if compiled_step is None:  # compile ahead
                    compiled_step = compile_step(train_step, state, batch, base_key, step)
                state, metrics = compiled_step(state, batch, base_key)
                step += 1
                pending.append(metrics)
                # At most one step in flight: wait for the step before this one, so that a
                # preemption signal is acted on within about one step (the host still prepares
                # the next batch while this step runs).
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                in_flight = metrics
                ckpt.poll()  # a failed or hung asynchronous save stops the run here
                hooks.report(step)
                hooks.logger(step)
                preempted = preempt.signal is not None or ckpt.manager.reached_preemption(step)
                hooks.checkpoint(step, state, preempted)
                hooks.grid(step, state)
                if preempted:
                    logging.warning(
                        "Preempted: checkpoint saved at step %d; relaunch the same "
                        "command to resume.",
                        step,
                    )
                    break
        except BaseException:
            failed = True
            raise
        finally:
            if hasattr(batches, "close"):
                batches.close()
            # Waits for the save in flight (bounded: save_timeout_s; close_timeout_s after an
            # error, when SIGTERM / SIGINT also end the wait at once). A failure of its own after
            # an error is logged beside the error that ended the loop, which is the one raised.
            try:
                ckpt.close(
                    after_error=failed,
                    should_abort=(lambda: preempt.signal is not None) if failed else None,
                )
            except CheckpointSaveError as close_error:
                if not failed:
                    raise
                logging.error("While stopping after the error below: %s", close_error)
            hooks.logger.close()
            cpu_runtime.release_free_heap()  # the kept step temporaries: evaluation needs others
    return state


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` in ``workdir``, resuming from its newest good checkpoint if any.

    Writes ``checkpoints/`` (rolling + permanent every ``keep_every``), TensorBoard event files,
    ``metrics.jsonl`` (one line per ``log_every`` steps), ``config.json`` and
    ``samples/step_*.png``. Returns the final `TrainState` (at ``num_train_steps``, or earlier
    when preempted).
    """
    from clu import metric_writers

    from diffusion.data import create_input_pipeline

    # --- validate, mesh
    workdir = io.absolute(workdir)  # Orbax needs absolute paths
    mesh = parallel.make_mesh()
    validate_config(config, num_devices=mesh.devices.size, process_count=jax.process_count())
    io.probe_writable(workdir, what="workdir")  # names the path and the fix before compiling
    main = parallel.is_main_process()
    tr = config.training
    # --- input first: a missing data set fails in seconds, before any compilation
    pipeline = create_input_pipeline(config)

    # --- model, schedule, optimizer, step
    model = create_model(config)
    schedule = schedule_from_config(config)
    tx = make_optimizer(config)
    train_step = step_lib.make_train_step(config, model, schedule, tx, mesh)
    # Built under jit so that it is a global replicated array on multi-host meshes too.
    base_key = jax.jit(
        lambda: jax.random.key(config.seed), out_shardings=parallel.replicated_sharding(mesh)
    )()

    # --- checkpoint: resume or start
    ckpt = Checkpointer(
        io.join(workdir, "checkpoints"),
        keep_every=tr.keep_every,
        save_timeout_s=tr.get("save_timeout_s", 300.0),
    )
    params_only = tr.resume == "params"
    kind, history, _ = t_sampler.sampler_options(config)
    state = restore_or_init(
        ckpt,
        abstract_state(config, model, mesh),
        init=lambda: init_state(config, model, tx, mesh),
        new_opt_state=jax.jit(tx.init, out_shardings=parallel.replicated_sharding(mesh)),
        params_only=params_only,
        workdir=workdir,
        config_differences=lambda saved: incompatible_fields(
            saved, config, optimizer=not params_only
        ),
        new_t_sampler=jax.jit(
            lambda: t_sampler.init_state(kind, config.diffusion.num_timesteps, history),
            out_shardings=parallel.replicated_sharding(mesh),
        ),
    )
    start = int(jax.device_get(state.step))
    last_good = lambda: ckpt.last_good  # noqa: E731
    if main:
        config_path = io.join(workdir, "config.json")
        storage_op(
            "writing the run's config",
            config_path,
            last_good,
            lambda: io.write_json(config_path, config_to_dict(config), indent=2, sort_keys=True),
        )

    # --- input, logging, hooks
    batches = pipeline.iterator(start)
    # TensorBoard event files go through TensorFlow's file system (gs:// included).
    writer = metric_writers.create_default_writer(
        workdir, just_logging=not (main and tr.get("tensorboard", True))
    )
    if start == 0:
        writer.write_hparams({k: v for k, v in _flatten(config_to_dict(config)).items()})
    hooks, pending = make_hooks(config, workdir, ckpt, writer, model, schedule, start, main)
    return run_steps(
        state,
        train_step,
        batches,
        base_key,
        start=start,
        num_steps=tr.num_train_steps,
        ckpt=ckpt,
        pending=pending,
        hooks=hooks,
        to_global=lambda batch: parallel.global_batch_from_local(batch, mesh),
    )


def make_hooks(
    config, workdir: str, ckpt, writer, model, schedule, start: int, main: bool
) -> Tuple[Hooks, PendingMetrics]:
    """The loop's hooks for ``config`` and the metrics buffer they share: progress report,
    `MetricsLogger` (``metrics.jsonl`` and ``writer``), `CheckpointHook` (into ``ckpt``) and
    `GridHook` (``samples/``); files are written by the main process only."""
    from clu import periodic_actions

    tr = config.training
    last_good = lambda: ckpt.last_good  # noqa: E731
    pending = PendingMetrics(tr.nonfinite, start, ckpt.directory)
    checkpoint = CheckpointHook(ckpt, config, pending, start)
    hooks = Hooks(
        report=periodic_actions.ReportProgress(
            num_train_steps=tr.num_train_steps, writer=writer, every_steps=tr.log_every
        ),
        logger=MetricsLogger(
            tr.log_every,
            tr.num_train_steps,
            pending,
            writer,
            io.join(workdir, "metrics.jsonl") if main else None,
            last_good,
        ),
        checkpoint=checkpoint,
        grid=GridHook(
            tr.sample_every,
            tr.num_train_steps,
            pending,
            lambda: grid_sampler(config, model, schedule),
            rng.stream(config.seed, rng.GRID_SAMPLES),
            io.join(workdir, "samples") if main else None,
            writer,
            last_good,
        ),
    )
    return hooks, pending


def _flatten(d, prefix=""):
    """A nested dict as ``{'a.b': leaf}`` with non-scalar leaves as strings (for hparams)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
