"""Orbax checkpoints of the `TrainState` and the run's config.

One `CheckpointManager` (``args=`` API) under ``<workdir>/checkpoints``: a rolling checkpoint to
resume from (the newest ``max_to_keep``) plus permanent ones every ``keep_every`` steps (Orbax's
``keep_period``) for evaluation sweeps. Every process calls `save` (Orbax coordinates the hosts and
writes atomically: a step directory appears only once complete). `restore_latest` walks back from
the newest step and skips a checkpoint that fails to restore (truncated, corrupt), reporting it;
it never deletes anything.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_like"]


def abstract_like(tree: Any, sharding=None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with ``sharding``) to restore ``tree``'s structure into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or
                                                       getattr(x, "sharding", None)), tree)


class Checkpointer:
    """Saves and restores ``(TrainState, config dict)`` pairs in ``directory``."""

    def __init__(self, directory: str, *, keep_every: Optional[int] = None, max_to_keep: int = 2,
                 async_save: bool = True):
        if "://" not in str(directory):
            directory = os.path.abspath(directory)   # Orbax needs absolute paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every, create=True,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self.directory = directory
        self.manager = ocp.CheckpointManager(directory, options=options,
                                             item_names=("state", "config"))

    def all_steps(self):
        """Steps of the complete checkpoints on disk, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, config_dict: dict, *, force: bool = True) -> bool:
        """Saves (asynchronously) ``state`` and ``config_dict`` at ``step``; every process calls it."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict)), force=force)

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        """Restores the checkpoint at ``step`` into the structure/shardings of ``abstract_state``."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
        return out["state"], out["config"]

    def restore_config(self, step: int) -> dict:
        """Only the config saved with ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def restore_latest(self, abstract_state: Any) -> Optional[Tuple[Any, dict, int]]:
        """The newest checkpoint that restores cleanly as ``(state, config_dict, step)``, or None.

        A checkpoint that fails to restore (truncated, corrupt) is reported and moved aside to
        ``<directory>_corrupt/`` (never deleted, and never counted by the rotation that prunes
        old checkpoints), so the run resumes from the newest good one. Unfinished saves are not
        listed at all: Orbax only renames a step directory into place once it is complete.
        """
        for step in reversed(self.all_steps()):
            try:
                state, config = self.restore(step, abstract_state)
                return state, config, step
            except Exception as e:  # noqa: BLE001 - any failure means: not usable, try older
                where = self._quarantine(step)
                logging.error("Checkpoint at step %d in %s could not be restored (%s: %s); moved "
                              "it to %s and trying an older one.", step, self.directory,
                              type(e).__name__, str(e)[:300], where)
        return None

    def _quarantine(self, step: int) -> str:
        """Moves the step directory to ``<directory>_corrupt/<step>-<time>`` (process 0 moves,
        all processes wait), then re-reads the manager's view of the directory."""
        import jax
        from jax.experimental import multihost_utils
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory.rstrip("/") + "_corrupt", f"{step}-{int(time.time())}")
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"quarantine_{step}")
        self.manager.reload()
        return dst

    def wait(self) -> None:
        """Blocks until asynchronous saves have finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
