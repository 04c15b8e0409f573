"""Training: the jit-compiled sharded train step (Algorithm 1) and the loop `train_and_evaluate`.

The model, schedule, optimizer and initial state come from `diffusion.factories` (re-exported here
for existing callers); this module adds the step and the loop (mesh, input, checkpoint, logging,
samples). Randomness is stateless: the step's key is
``fold_in(key(seed), step)``, the data order a pure function of (seed, step), so a resumed run
draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion import cpu_runtime, io, losses, parallel, rng, samplers, sampling
from diffusion.checkpoint import (
    Checkpointer,
    CheckpointIncompatibleError,
    CheckpointSaveError,
    storage_problem,
)
from diffusion.config_check import ConfigError, incompatible_fields, validate_config
from diffusion.factories import (
    TrainState,
    abstract_state,
    config_to_dict,
    create_model,
    init_state,
    learning_rate_fn,
    make_denoise_fn,
    make_optimizer,
    parameterization,
    schedule_from_config,
)
from diffusion.schedules import Schedule

__all__ = [
    "TrainState",
    "NonFiniteError",
    "ResumeMismatchError",
    "create_model",
    "schedule_from_config",
    "make_optimizer",
    "learning_rate_fn",
    "init_state",
    "make_train_step",
    "make_denoise_fn",
    "train_and_evaluate",
    "config_to_dict",
    "save_image_grid",
]


# ----------------------------------------------------------------------------- step
def _quartile_means(per_example, t, num_timesteps):
    """Mean loss in each quarter of [0, T): ``[B], [B] -> [4]`` (nan for an empty quarter)."""
    q = jnp.clip((t * 4) // num_timesteps, 0, 3)
    onehot = jax.nn.one_hot(q, 4, dtype=per_example.dtype)
    sums = onehot.T @ per_example
    counts = onehot.sum(0)
    return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), jnp.nan)


def make_train_step(config, model, schedule: Schedule, tx, mesh=None) -> Callable:
    """The compiled step ``(state, batch, base_key) -> (state, metrics)`` (Algorithm 1).

    ``batch['image']`` ``[B, H, W, C]`` in [−1, 1], sharded over 'data'; ``state`` is donated.
    Per step: key = fold_in(base_key, step) → t ~ U{0..T−1}, ε ~ N(0, I), dropout key; loss and
    gradients; clip + Adam; EMA of the parameters. Metrics: loss, loss per t-quartile, grad norm
    (before clipping), lr, and ``finite`` (1 if loss and gradients are finite). With
    ``training.nonfinite='skip'`` a non-finite step leaves the state unchanged except ``step``.
    """
    tr = config.training
    T = config.diffusion.num_timesteps
    lr_fn = learning_rate_fn(config)
    skip_nonfinite = tr.nonfinite == "skip"
    groups = tr.grad_clip_groups if tr.grad_clip > 0 else 0
    param = parameterization(config)  # validated once

    def step_fn(state: TrainState, batch: Dict[str, jnp.ndarray], base_key):
        x0 = batch["image"]
        key = jax.random.fold_in(base_key, state.step)
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        B = x0.shape[0]
        t = jax.random.randint(t_key, (B,), 0, T, dtype=jnp.int32)
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)

        def loss_fn(params, x0, x_t_noise, t, dropout_key):
            def denoise_fn(x_t, t):  # the network in training mode (dropout on)
                return model.apply(
                    {"params": params}, x_t, t, train=True, rngs={"dropout": dropout_key}
                ).astype(jnp.float32)

            per_ex, _ = losses.training_losses(
                schedule, denoise_fn, x0, t, x_t_noise, **param.loss_kwargs
            )
            return per_ex.mean(), per_ex

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if groups <= 1:
            (loss, per_ex), grads = grad_fn(state.params, x0, noise, t, dropout_key)
            grad_norm = optax.tree.norm(grads)
        else:
            # The released TPU code: each core clips the gradient of its own share of the batch
            # to grad_clip, then the clipped gradients are averaged (the optimizer's global clip
            # that follows is then a no-op: a mean of vectors of norm <= c has norm <= c).
            split = lambda a: a.reshape((groups, B // groups) + a.shape[1:])  # noqa: E731
            keys = jax.random.split(dropout_key, groups)
            (losses_g, per_ex_g), grads_g = jax.vmap(grad_fn, in_axes=(None, 0, 0, 0, 0))(
                state.params, split(x0), split(noise), split(t), keys
            )
            loss, per_ex = losses_g.mean(), per_ex_g.reshape(B)
            grad_norm = optax.tree.norm(jax.tree.map(lambda g: g.mean(0), grads_g))
            norms = jax.vmap(optax.tree.norm)(grads_g)
            scale = jnp.minimum(1.0, tr.grad_clip / jnp.maximum(norms, 1e-30))
            grads = jax.tree.map(lambda g: jnp.tensordot(scale, g, axes=1) / groups, grads_g)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = tr.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        if skip_nonfinite:
            new = jax.tree.map(
                lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1)
            )
        q = _quartile_means(per_ex, t, T)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr_fn(state.step),
            "finite": finite.astype(jnp.float32),
            **{f"loss_q{i}": q[i] for i in range(4)},
        }
        return new, metrics

    if mesh is None:
        return jax.jit(step_fn, donate_argnums=(0,))
    rep, data = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    return jax.jit(
        step_fn, in_shardings=(rep, data, rep), out_shardings=(rep, rep), donate_argnums=(0,)
    )


# ----------------------------------------------------------------------------- loop helpers
class ResumeMismatchError(ConfigError, CheckpointIncompatibleError):
    """The workdir's checkpoint holds a different tree than this config builds (a `ConfigError`
    and a `CheckpointIncompatibleError`); nothing in the workdir was changed."""


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


class _Preemption:
    """Turns SIGTERM / SIGINT into a flag the loop polls: save, then exit cleanly."""

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


def save_image_grid(images: np.ndarray, path: str) -> None:
    """Tiles uint8 images ``[N, H, W, C]`` into a square PNG grid at ``path`` (local or
    ``gs://``); see `diffusion.io.save_image_grid`."""
    io.save_image_grid(images, path)


def _grid_sampler(config, model, schedule) -> Callable:
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


def _storage_op(what: str, path: str, last_good: Callable[[], object], fn: Callable[[], None]):
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


def _check_workdir(workdir: str) -> None:
    """Writes, reads back and deletes a probe file in ``workdir`` (local or ``gs://``) before
    anything is compiled; the error names the path and the fix (missing bucket, permissions)."""
    io.probe_writable(workdir, what="workdir")


# ----------------------------------------------------------------------------- the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` in ``workdir``, resuming from its newest good checkpoint if any.

    Writes ``checkpoints/`` (rolling + permanent every ``keep_every``), TensorBoard event files,
    ``metrics.jsonl`` (one line per ``log_every`` steps), ``config.json`` and
    ``samples/step_*.png``. Returns the final `TrainState`.
    """
    from clu import metric_writers, periodic_actions

    from diffusion.data import create_input_pipeline

    # --- validate, mesh
    workdir = io.absolute(workdir)  # Orbax needs absolute paths
    mesh = parallel.make_mesh()
    validate_config(config, num_devices=mesh.devices.size, process_count=jax.process_count())
    _check_workdir(workdir)
    main = parallel.is_main_process()
    tr = config.training
    # --- input first: a missing data set fails in seconds, before any compilation
    pipeline = create_input_pipeline(config)

    # --- model, schedule, optimizer, step
    model = create_model(config)
    schedule = schedule_from_config(config)
    tx = make_optimizer(config)
    train_step = make_train_step(config, model, schedule, tx, mesh)
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
    abstract = abstract_state(config, model, mesh)
    params_only = tr.resume == "params"
    how = (
        f"To continue: relaunch with the config this workdir was started with (saved in "
        f"{workdir}/config.json), or use a new --workdir, or add "
        "--config.training.resume=params to take the parameters and EMA from the checkpoint "
        "into a fresh optimizer state."
    )
    try:
        restored = ckpt.restore_latest(
            abstract,
            params_only=params_only,
            how_to_proceed=how,
            config_differences=lambda saved: incompatible_fields(
                saved, config, optimizer=not params_only
            ),
        )
    except CheckpointIncompatibleError as e:
        raise ResumeMismatchError(str(e)) from e
    if restored is None:
        state = init_state(config, model, tx, mesh)
    elif params_only:
        saved, _, at = restored
        new_opt = jax.jit(tx.init, out_shardings=parallel.replicated_sharding(mesh))(
            saved["params"]
        )
        state = TrainState(
            step=saved["step"],
            params=saved["params"],
            ema_params=saved["ema_params"],
            opt_state=new_opt,
        )
        logging.warning(
            "Resumed parameters and EMA from step %d in %s with a NEW optimizer state "
            "(training.resume=params).",
            at,
            workdir,
        )
    else:
        state, _, at = restored
        logging.info("Resumed from step %d in %s", at, workdir)
    start = int(jax.device_get(state.step))
    if main:
        config_path = io.join(workdir, "config.json")
        _storage_op(
            "writing the run's config",
            config_path,
            lambda: ckpt.last_good,
            lambda: io.write_json(config_path, config_to_dict(config), indent=2, sort_keys=True),
        )

    # --- input, logging
    batches = pipeline.iterator(start)
    # TensorBoard event files go through TensorFlow's file system (gs:// included).
    writer = metric_writers.create_default_writer(
        workdir, just_logging=not (main and tr.get("tensorboard", True))
    )
    if start == 0:
        writer.write_hparams({k: v for k, v in _flatten(config_to_dict(config)).items()})
    report = periodic_actions.ReportProgress(
        num_train_steps=tr.num_train_steps, writer=writer, every_steps=tr.log_every
    )
    grid_sampler = None
    grid_key = rng.stream(config.seed, rng.GRID_SAMPLES)
    pending = []  # device metrics since the last host sync
    last_saved = start

    def flush(step):
        """Fetches pending metrics; raises NonFiniteError if any step was non-finite."""
        nonlocal pending
        if not pending:
            return None
        got = jax.device_get(pending)
        pending = []
        for i, m in enumerate(got):
            if m["finite"] < 1 and tr.nonfinite == "raise":
                bad_step = step - len(got) + i + 1
                what = "loss" if not np.isfinite(m["loss"]) else "gradient norm"
                raise NonFiniteError(
                    f"Non-finite {what} at step {bad_step} (loss={m['loss']}, grad_norm="
                    f"{m['grad_norm']}). The state was not saved; the last good checkpoint is step "
                    f"{last_saved} in {ckpt.directory}. Lower --config.training.lr, check the data, "
                    "or set --config.training.nonfinite=skip."
                )
        return got

    def save(step):
        nonlocal last_saved
        flush(step)  # never save a state that went non-finite
        try:
            ckpt.save(step, state, config_to_dict(config))
        except CheckpointSaveError:
            raise  # names the step, the last good one and the fix already
        except OSError as e:
            raise OSError(
                f"Could not save the checkpoint at step {step} in {ckpt.directory} "
                f"({e}). The last good checkpoint, step {last_saved}, is untouched; free "
                "space or fix the workdir, then relaunch to resume from it."
            ) from e
        last_saved = step

    compiled_step = None
    in_flight = None  # metrics of the step dispatched last
    failed = False  # the loop is ending by an exception
    with _Preemption() as preempt:
        step = start
        try:
            while step < tr.num_train_steps:
                batch = parallel.global_batch_from_local(next(batches), mesh)
                if compiled_step is None:  # compile ahead (a wrapped step is used as is)
                    t_compile = time.time()
                    logging.info(
                        "Compiling the train step (once per launch; seconds for small "
                        "models, a minute or more for the CIFAR10 U-Net on a CPU) ..."
                    )
                    compiled_step = (
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
                report(step)
                if step % tr.log_every == 0 or step == tr.num_train_steps:
                    got = flush(step)
                    scalars = {k: _nanmean([m[k] for m in got]) for k in got[-1]}
                    scalars["skipped_steps"] = float(sum(1 - m["finite"] for m in got))
                    writer.write_scalars(step, scalars)
                    if main:
                        metrics_path = io.join(workdir, "metrics.jsonl")
                        line = json.dumps({"step": step, **scalars})
                        _storage_op(
                            f"appending step {step}'s metrics",
                            metrics_path,
                            lambda: ckpt.last_good,
                            lambda: io.append_line(metrics_path, line),
                        )
                preempted = preempt.signal is not None or ckpt.manager.reached_preemption(step)
                if (
                    step % tr.checkpoint_every == 0
                    or step % tr.keep_every == 0
                    or step == tr.num_train_steps
                    or preempted
                ):
                    save(step)
                if step % tr.sample_every == 0 or step == tr.num_train_steps:
                    flush(step)
                    # With DDPM_KEEP_FREED_MEMORY the heap keeps the step's ~2 GB of freed
                    # temporaries (CIFAR10 b32); compiling and running the sampler on top of it
                    # would add its own. Give it back first (the next step faults it in once).
                    cpu_runtime.release_free_heap()
                    grid_sampler = grid_sampler or _grid_sampler(config, model, schedule)
                    images = grid_sampler(state.ema_params, grid_key)  # same noise every time
                    if main:
                        grid_path = io.join(workdir, "samples", f"step_{step:08d}.png")
                        _storage_op(
                            f"writing step {step}'s sample grid",
                            grid_path,
                            lambda: ckpt.last_good,
                            lambda: io.save_image_grid(images, grid_path),
                        )
                        writer.write_images(step, {"ema_samples": images[:16]})
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
            writer.flush()
            cpu_runtime.release_free_heap()  # the kept step temporaries: evaluation needs others
    return state


def _nanmean(values) -> float:
    """Mean ignoring NaN (an empty t-quartile in a small batch); NaN if all are NaN."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
