"""Evaluation mode: samples → FID / KID / IS, bits/dim of the bound, over one or all checkpoints.

``launch.py --mode evaluate`` calls ``run(config, workdir, mode="evaluate")``; ``--mode sample``
calls ``run(..., mode="sample")``. This module is the driver; the pieces live in
`diffusion.evaluation` (settings, sample generator, evaluators, results store). For every
checkpoint step chosen by ``config.eval.checkpoints`` (``'latest'``: the newest; ``'all'``: every
step on disk, ascending) the EMA parameters are restored and the evaluators of
`evaluation.evaluators.evaluators_from_config` run:

1. ``config.eval.num_samples`` (N) samples are drawn with the configured sampler
   (``config.sample``: ``method`` — ``ancestral``, ``ddim``, ``dpmpp_2m``, ``dpmpp_2m_sde``,
   ``heun`` or any registered one — over ``num_steps`` steps, 0 = the full T-step chain), in
   global batches of ``config.eval.batch_size`` sharded over all
   devices (`evaluation.generator.sample_in_batches`), and saved as uint8 ``.npz`` plus a grid PNG, so an
   interrupted evaluation reuses them.
2. FID and KID (mean ± s.e.) of those samples against the FID-Inception statistics of
   ``config.data.dataset`` / each split of ``config.eval.fid_split`` (``'train'``, or
   ``'train,test'`` for both of Table 1's references from the same samples; a whole split, or its
   first `settings.DEFAULT_FID_NUM_REFERENCE` = 50,000 images when larger: pass a sliced split such as
   ``'train[:10000]'`` to choose another N_ref). Reference statistics are cached in
   ``<data_dir>/fid_stats/<network>/`` (falling back to ``<workdir>/eval/fid_stats/<network>/``
   when the data dir is not writable). Grayscale images are repeated to 3 channels. Every FID is
   reported with its N ("FID@1000 = 23.4 (N_gen=1000, N_ref=4500)"): FID is strongly biased at
   small N, so compare only at equal N. Beside the first split's FID: the real-data floor (real
   images scored the same way, ``config.eval.real_floor_split``) and the Inception Score when
   ``config.eval.inception_weights`` names a network with the logits layer.
3. bits/dim of the variational bound on the first ``config.eval.bpd_num_examples`` examples of
   each split of ``config.eval.bpd_split``: the full bound (`likelihood.bits_per_dim`, T network
   calls per example) with total (± s.e.), prior, rate / distortion (paper Table 4), and the mean
   per-t terms and per-t mse of x̂_0 (Fig. 5) as lists indexed by the code index t; or, with
   ``config.eval.bpd_timesteps = K``, the unbiased estimate from K random timesteps per example
   (`likelihood.bound_estimate`, K + 1 calls) with its standard error.

Results go to ``<workdir>/eval/results.json`` keyed by step and rewritten atomically after each
metric; each metric stores the settings it was computed with, and a metric whose settings match
the current config is not recomputed (so a rerun skips finished steps, and an interrupted one
loses at most the metric in progress). The first split's metrics are stored as ``fid`` / ``kid``
/ ``inception_score`` / ``bpd``, a further split ``s`` as ``fid@s`` / ``bpd@s``. Scalars also go
to TensorBoard in ``<workdir>/eval``. ``num_samples = 0`` skips FID/KID, ``bpd_num_examples = 0``
skips bits/dim.

Files under ``<workdir>/eval/``::

    results.json                                   all metrics, keyed by step
    real_floor.json                                the real-data FID floor and its settings
    samples_step_<step>_n<N>_<chain>[_pI].npz      uint8 samples ('images') of evaluate mode
    samples_step_<step>_n<N>_<chain>.png           grid of the first 64 of them
    samples_step_<step>_n<N>_<chain>_x4.png        the same grid enlarged 4x (nearest neighbour)
    features_step_<step>_n<N>_<chain>.npz          their Inception features (reused on resume)
    samples_step_<step>.png / .npz                 sample mode: a grid of num_grid_samples
    samples_step_<step>_x4.png                     sample mode: that grid enlarged 4x
    events.out.tfevents.*                          TensorBoard scalars and images

``<step>`` is zero-padded to 8 digits (as ``samples/step_*.png`` of training); ``<chain>`` is
the sampler's tag (`samplers.tag`: ``full<T>``, ``respaced<K>``, ``ddim<K>_eta<η>``,
``dpmpp_2m<K>_logsnr``, ``heun<K>_rho7``, ...); ``_pI`` marks process
I's share in a multi-process run.

Multi-process runs: every process restores the state and samples its share on the global mesh;
Inception features are extracted per process and all-gathered, then every process computes the
same metrics (reference statistics are computed once per process and cached); process 0 writes
results.json, PNGs and TensorBoard.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np

from diffusion import factories, io, parallel, samplers
from diffusion.checkpoint import Checkpointer
from diffusion.config_check import ConfigError, incompatible_fields, validate_config
from diffusion.evaluation import generator
from diffusion.evaluation.evaluators import (
    EvalContext,
    evaluators_from_config,
)
from diffusion.evaluation.results import from_process_0
from diffusion.evaluation.settings import (
    FEATURE_BATCH_SIZE,
    FID_NETWORK,
    eval_config_problems,
)
from diffusion.progress import format_seconds

__all__ = ["run", "checkpoint_steps", "restore_ema_params"]


def _validate(config, mesh) -> None:
    nd, pc = int(mesh.devices.size), jax.process_count()
    validate_config(config, num_devices=nd, process_count=pc)  # includes config.eval
    problems = eval_config_problems(config, num_devices=nd, process_count=pc)
    if problems:
        raise ConfigError(
            "Invalid config (%d problem%s):\n  - %s"
            % (len(problems), "" if len(problems) == 1 else "s", "\n  - ".join(problems))
        )


# ----------------------------------------------------------------------------- checkpoints
def _no_checkpoint_error(workdir: str, ckpt_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"No checkpoint in {ckpt_dir} (workdir {workdir!r}): train first, e.g. `python launch.py "
        f"--config <config> --workdir {workdir} --mode train` (or --mode train_and_evaluate), or "
        "point --workdir at a trained run."
    )


def checkpoint_steps(workdir: str, which: str = "latest") -> List[int]:
    """Steps to evaluate in ``<workdir>/checkpoints``: ``'latest'`` → ``[newest]``; ``'all'`` →
    every complete step on disk, ascending. Raises FileNotFoundError when there is none."""
    ckpt_dir = io.join(workdir, "checkpoints")
    if not io.isdir(ckpt_dir):
        raise _no_checkpoint_error(workdir, ckpt_dir)
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    if not steps:
        raise _no_checkpoint_error(workdir, ckpt_dir)
    if which not in ("latest", "all"):
        raise ValueError(f"which={which!r}: use 'latest' or 'all'")
    return steps if which == "all" else steps[-1:]


def _abstract_state(config, model, mesh):
    return factories.abstract_state(config, model, mesh)


def restore_ema_params(ckpt: Checkpointer, step: int, config, model, mesh) -> Any:
    """The EMA parameters of the checkpoint at ``step``, replicated on ``mesh``; only the model
    and process must match the config (the optimizer and timestep-sampler state are not read
    into a config-built tree, so evaluating with other training switches works).

    Raises ConfigError when the checkpoint was trained with a different model/process
    (`config_check.SHAPE_FIELDS`)."""
    diffs = incompatible_fields(ckpt.restore_config(step), config, optimizer=False)
    if diffs:
        raise ConfigError(
            f"The checkpoint at step {step} in {ckpt.directory} was trained with a "
            "different model/process than this config:\n  - "
            + "\n  - ".join(diffs)
            + "\nEvaluate with the config the run was trained with."
        )
    sharding = parallel.replicated_sharding(mesh) if mesh is not None else None
    return ckpt.restore_params_only(step, sharding)["ema_params"]


# ----------------------------------------------------------------------------- the modes
def evaluate_step(
    ctx: EvalContext, evaluators, step: int, params_fn: Callable[[], Any]
) -> Dict[str, Any]:
    """Runs every evaluator whose stored result (in ``ctx.store``) does not match its current
    settings on the checkpoint at ``step``; ``params_fn()`` restores the EMA parameters only when
    something is to be computed. Returns the step's results entry."""
    entry = ctx.store.entry(step)
    needed = from_process_0([ev.needed(ctx, entry) for ev in evaluators])
    if not any(needed):
        logging.info("Step %d: already evaluated in %s; skipping.", step, ctx.store.path)
        return entry
    params = params_fn()
    entry["step"] = step
    ctx.step_samples.new_step()
    scalars = {}
    for ev, need in zip(evaluators, needed):
        if need:
            scalars.update(ev.evaluate(ctx, step, params, entry))
    if ctx.main:
        ctx.writer.write_scalars(step, scalars)
        ctx.writer.flush()
    return entry


def sample_step(ctx: EvalContext, step: int, params) -> str:
    """``--mode sample``: a grid of ``training.num_grid_samples`` samples of ``step`` with the
    configured sampler, as ``eval/samples_step_<step>.png`` (+ ``.npz``, and the grid enlarged 4x
    for viewing, ``_x4.png``). Returns the PNG path."""
    c = ctx.config
    n = int(c.training.get("num_grid_samples", 64) or 64)
    n = math.ceil(n / jax.process_count()) * jax.process_count()
    logging.info(
        "Step %d: drawing a grid of %d samples with the %s chain",
        step,
        n,
        samplers.describe(ctx.spec, c.diffusion.num_timesteps),
    )
    images = generator.generate_samples(c, ctx.model, params, n, mesh=ctx.mesh, spec=ctx.spec)
    png = io.join(ctx.eval_dir, f"samples_step_{step:08d}.png")
    if ctx.main:
        io.write_npz(
            png[:-4] + ".npz",
            images=images,
            step=np.asarray(step),
            seed=np.asarray(c.seed),
            chain=np.asarray(ctx.chain),
        )
        io.save_sample_grid(images, png)
        ctx.writer.write_images(step, {f"samples_{ctx.chain}": images[:16]})
        logging.info("Step %d: wrote %s", step, png)
    return png


def run(
    config,
    workdir: str,
    *,
    mode: str = "evaluate",
    feature_fn: Optional[Callable] = None,
    feature_network: Optional[str] = None,
) -> Dict[int, Any]:
    """Evaluates (``mode='evaluate'``) or samples from (``mode='sample'``) the checkpoints of
    ``workdir`` chosen by ``config.eval.checkpoints``; see the module docstring.

    Args:
      config: the run's config (the model/process fields must match the checkpoint's).
      workdir: the training workdir (``<workdir>/checkpoints``); outputs go to ``<workdir>/eval``.
      mode: ``'evaluate'`` or ``'sample'``.
      feature_fn: ``[B, H, W, 3] uint8 -> [B, D]`` to use instead of the FID Inception network
        (tests, other feature networks); ``feature_network`` then names it (default
        ``'custom'``) so its cached statistics and stored results never mix with Inception's.

    Returns:
      ``{step: results entry}`` (evaluate) or ``{step: PNG path}`` (sample).

    Raises:
      FileNotFoundError: no checkpoint in ``<workdir>/checkpoints`` (train first).
      ConfigError: invalid eval settings, or a config that does not match the checkpoint.
    """
    from clu import metric_writers

    if mode not in ("evaluate", "sample"):
        raise ValueError(f"mode={mode!r}: use 'evaluate' or 'sample'")
    mesh = parallel.make_mesh()
    _validate(config, mesh)
    steps = checkpoint_steps(workdir, config.eval.checkpoints)
    network = FID_NETWORK if feature_fn is None else (feature_network or "custom")
    ev = EvalContext(
        config,
        workdir,
        mesh,
        feature_fn=feature_fn,
        network=network,
        feature_batch_size=FEATURE_BATCH_SIZE,
    )
    evaluators = evaluators_from_config(config)
    io.makedirs(ev.eval_dir)  # every process: each saves its share of samples
    ev.writer = metric_writers.create_default_writer(
        ev.eval_dir,
        just_logging=not (ev.main and config.training.get("tensorboard", True)),
        asynchronous=False,
    )
    ckpt = Checkpointer(io.join(workdir, "checkpoints"), async_save=False)
    logging.info(
        "%s %d checkpoint(s) of %s: steps %s",
        "Evaluating" if mode == "evaluate" else "Sampling from",
        len(steps),
        workdir,
        steps,
    )
    out: Dict[int, Any] = {}
    try:
        for i, step in enumerate(steps):
            logging.info("=== step %d (%d/%d) ===", step, i + 1, len(steps))
            params_fn = lambda s=step: restore_ema_params(ckpt, s, config, ev.model, mesh)  # noqa
            if mode == "sample":
                out[step] = sample_step(ev, step, params_fn())
            else:
                out[step] = evaluate_step(ev, evaluators, step, params_fn)
                ev.store.save()
        if mode == "evaluate":
            _log_summary(out)
        if ev.timings:
            logging.info(
                "Evaluation wall time by stage: %s",
                ", ".join(f"{k} {format_seconds(v)}" for k, v in ev.timings.items()),
            )
    finally:
        ckpt.close()
        ev.writer.flush()
        ev.writer.close()
    return out


def _log_summary(results: Dict[int, Any]) -> None:
    for step, e in sorted(results.items()):
        parts = [f"step {step}:"]
        if "fid" in e:
            f, k = e["fid"], e["kid"]
            parts.append(
                f"FID@{f['num_gen']} = {f['value']:.3f} (N_gen={f['num_gen']}, "
                f"N_ref={f['num_ref']}), KID = {k['mean']:.5f} ± {k['se']:.5f}"
            )
        for key in sorted(k for k in e if k.startswith("fid@")):
            parts.append(
                f"{key}: FID@{e[key]['num_gen']} = {e[key]['value']:.3f} "
                f"(N_gen={e[key]['num_gen']}, N_ref={e[key]['num_ref']})"
            )
        for key in sorted(k for k in e if k == "bpd" or k.startswith("bpd@")):
            b = e[key]
            parts.append(
                f"bits/dim{key[3:]} = {b['total']:.4f} ± {b['total_se']:.4f} "
                f"(N={b['num_examples']})"
            )
        parts = parts[:1] + ["; ".join(parts[1:])]
        logging.info(" ".join(parts))
