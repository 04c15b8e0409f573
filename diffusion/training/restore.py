"""Where a training run starts: the newest good checkpoint of the workdir, or a fresh state.

`restore_or_init` has three outcomes: no checkpoint → a fresh state from ``init``; a checkpoint
→ the whole `TrainState` (bitwise what was saved); with ``training.resume='params'`` → the saved
parameters and EMA with a NEW optimizer state. A checkpoint whose tree differs from what the
config builds is a `ResumeMismatchError`, and nothing in the workdir is changed.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from diffusion.checkpoint import CheckpointIncompatibleError
from diffusion.config_check import ConfigError
from diffusion.factories import TrainState

__all__ = ["ResumeMismatchError", "restore_or_init", "how_to_proceed"]


class ResumeMismatchError(ConfigError, CheckpointIncompatibleError):
    """The workdir's checkpoint holds a different tree than this config builds (a `ConfigError`
    and a `CheckpointIncompatibleError`); nothing in the workdir was changed."""


def how_to_proceed(workdir: str) -> str:
    """The fix appended to a `ResumeMismatchError` for ``workdir``."""
    return (
        f"To continue: relaunch with the config this workdir was started with (saved in "
        f"{workdir}/config.json), or use a new --workdir, or add "
        "--config.training.resume=params to take the parameters and EMA from the checkpoint "
        "into a fresh optimizer state."
    )


def restore_or_init(
    ckpt,
    abstract,
    *,
    init: Callable[[], TrainState],
    new_opt_state: Callable[[object], object],
    params_only: bool,
    workdir: str,
    config_differences: Optional[Callable[[dict], list]] = None,
    new_t_sampler: Callable[[], object] = lambda: None,
) -> TrainState:
    """The state a run starts from.

    Args:
      ckpt: a `diffusion.checkpoint.Checkpointer` (only ``restore_latest`` is used).
      abstract: the target tree (`factories.abstract_state`) the checkpoint is restored into.
      init: builds a fresh state (called only when the workdir has no checkpoint).
      new_opt_state: ``params -> opt_state`` (called only for ``params_only``).
      params_only: ``training.resume == 'params'``: keep the saved step, parameters and EMA,
        start a new optimizer state.
      workdir: named in the log line and in the fix of a mismatch.
      config_differences: ``saved_config_dict -> [field, ...]`` that explain a mismatch.
      new_t_sampler: a fresh timestep-sampler state (`t_sampler.init_state`; only for
        ``params_only``: the importance history restarts with the optimizer).

    Raises `ResumeMismatchError` when the checkpoint's tree differs from ``abstract``.
    """
    try:
        restored = ckpt.restore_latest(
            abstract,
            params_only=params_only,
            how_to_proceed=how_to_proceed(workdir),
            config_differences=config_differences,
        )
    except CheckpointIncompatibleError as e:
        raise ResumeMismatchError(str(e)) from e
    if restored is None:
        return init()
    if params_only:
        saved, _, at = restored
        state = TrainState(
            step=saved["step"],
            params=saved["params"],
            ema_params=saved["ema_params"],
            opt_state=new_opt_state(saved["params"]),
            t_sampler=new_t_sampler(),
        )
        logging.warning(
            "Resumed parameters and EMA from step %d in %s with a NEW optimizer state "
            "(training.resume=params).",
            at,
            workdir,
        )
        return state
    state, _, at = restored
    logging.info("Resumed from step %d in %s", at, workdir)
    return state
