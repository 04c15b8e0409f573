"""Orbax checkpoints of the `TrainState` and the run's config, and how a run resumes from them.

One `CheckpointManager` (``args=`` API) under ``<workdir>/checkpoints``: a rolling checkpoint to
resume from (the newest ``max_to_keep``) plus permanent ones every ``keep_every`` steps (Orbax's
``keep_period``) for evaluation sweeps. Every process calls `save` (Orbax coordinates the hosts and
writes atomically: a step directory appears only once complete).

`restore_latest` walks back from the newest step and tells three kinds of failure apart:

* the saved tree does not match what this config builds (optimizer stages, parameter shapes):
  `CheckpointIncompatibleError` listing the differing fields and tree paths; nothing is moved;
* a transient read error (a flaky network file system or bucket: ``OSError``, or TensorStore's
  ``UNAVAILABLE`` / ``DEADLINE_EXCEEDED`` ...): retried with back-off, then `CheckpointReadError`
  naming the checkpoint; nothing is moved;
* unreadable data (truncated or corrupt files): that step is moved to
  ``<directory>_corrupt/<step>-<time>`` (never deleted) and the next older one is tried.

A workdir that holds checkpoints of which none restores stops with `NoRestorableCheckpointError`:
a run never silently starts again from step 0 over a workdir that has (or had) checkpoints.

Saving is asynchronous, and every wait on it is bounded. `Checkpointer.poll` (the training loop
calls it after every step) sees a finished save at once: a failed one (disk full, a dead bucket,
permissions) raises `CheckpointSaveError` naming the step that was not saved, the last good one
and the cause, after its ``<step>.orbax-checkpoint-tmp`` directory is removed (or named for the
user to remove, when even that fails). A save still running after ``save_timeout_s`` raises
`StorageTimeoutError`. `close` waits at most ``close_timeout_s`` (30 s by default) and then gives
up with `StorageTimeoutError`; the writer thread may still be blocked then, so the process should
end with ``os._exit`` (``launch.py`` does) instead of waiting for it at interpreter exit.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

import jax
import orbax.checkpoint as ocp

from diffusion import io, parallel

__all__ = [
    "Checkpointer",
    "abstract_like",
    "tree_differences",
    "CheckpointIncompatibleError",
    "CheckpointReadError",
    "NoRestorableCheckpointError",
    "CheckpointSaveError",
    "StorageTimeoutError",
    "is_transient_error",
    "storage_problem",
]

#: Parts of the saved `TrainState` that a ``resume='params'`` restore takes from a checkpoint.
PARAMS_ONLY = ("step", "params", "ema_params")

# TensorStore reports I/O failures as ValueError with an absl status code in the message.
_TRANSIENT_CODES = (
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "RESOURCE_EXHAUSTED",
    "ABORTED",
    "CANCELLED",
)
# Orbax's words for a tree or shape that does not match the target (not corruption).
_MISMATCH_WORDS = (
    "Structure mismatch",
    "is not compatible with the stored shape",
    "not found in metadata_tree",
)


class CheckpointIncompatibleError(ValueError):
    """The checkpoint is intact but holds a different tree than this config builds."""


class CheckpointReadError(OSError):
    """A checkpoint could not be read after retries (storage or network trouble); not moved."""


class NoRestorableCheckpointError(RuntimeError):
    """The workdir has (or had) checkpoints but none of them restores."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message names the step, the last good step, the
    cause and the fix. Earlier checkpoints are untouched."""


class StorageTimeoutError(CheckpointSaveError):
    """A checkpoint write (or the wait for one) did not finish within its time bound."""


# What a storage error means, from its text (OSError errno names, TensorStore's absl status
# codes, HTTP codes of object stores), with the fix; the first match wins.
_STORAGE_PROBLEMS = (
    (
        ("No space left", "ENOSPC", "os_error_code='28'", "RESOURCE_EXHAUSTED", "Disk quota"),
        "no space left",
        "free space on that file system (or point --workdir at a larger one)",
    ),
    (
        ("PERMISSION_DENIED", "Permission denied", "Forbidden", "403", "UNAUTHENTICATED", "401"),
        "permission denied",
        "grant the credentials in use write access to the workdir (or choose one they can write)",
    ),
    (
        ("NOT_FOUND", "No such file", "does not exist", "404"),
        "not found",
        "check that the workdir (and its bucket) still exists",
    ),
    (
        (
            "UNAVAILABLE",
            "DEADLINE_EXCEEDED",
            "out of retries",
            "Connection refused",
            "Cannot connect",
            "timed out",
            "Timeout",
            "ConnectionError",
            "ServerDisconnected",
        ),
        "storage unavailable",
        "check the network and that the bucket or file system is reachable",
    ),
)


def storage_problem(e: BaseException) -> Tuple[str, str]:
    """``(what, fix)`` for a storage error ``e`` (an ``OSError``, TensorStore's ``ValueError``
    with an absl status code, gcsfs' errors): e.g. ``('no space left', 'free space ...')``;
    ``('error', 'check the workdir ...')`` when the text matches no known kind."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, PermissionError):
        return _STORAGE_PROBLEMS[1][1:]
    if getattr(e, "errno", None) == 28:
        return _STORAGE_PROBLEMS[0][1:]
    for words, what, fix in _STORAGE_PROBLEMS:
        if any(w in text for w in words):
            return what, fix
    if isinstance(e, (TimeoutError, ConnectionError)):
        return _STORAGE_PROBLEMS[3][1:]
    return "error", "check the workdir's file system or bucket"


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: text`` of ``e`` on one line, cut at ``limit`` characters."""
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}"


def saved_form(tree: Any) -> Any:
    """What Orbax stores for ``tree``: a dataclass pytree (the `TrainState`) as the dict of its
    fields, leaving out fields that are None (the ``t_sampler`` of a uniform run). So a run's
    checkpoint has the same tree whether it was written before such a field existed or after,
    and old checkpoints keep restoring. Any other tree is stored as it is."""
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {
            f.name: getattr(tree, f.name)
            for f in dataclasses.fields(tree)
            if getattr(tree, f.name) is not None
        }
    return tree


def restored_form(restored: Any, like: Any) -> Any:
    """The inverse of `saved_form`: ``restored`` (a dict) as ``like``'s dataclass type, the
    fields it lacks left at their defaults."""
    if dataclasses.is_dataclass(like) and not isinstance(like, type):
        return type(like)(**restored)
    return restored


def abstract_like(tree: Any, sharding=None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with ``sharding``) to restore ``tree``'s structure into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=sharding or getattr(x, "sharding", None)
        ),
        tree,
    )


def is_transient_error(e: BaseException) -> bool:
    """True for errors worth retrying: I/O errors other than a missing file (inside a complete
    Orbax step a missing file means damage) and TensorStore's transient status codes."""
    if isinstance(e, FileNotFoundError):
        return False
    if isinstance(e, OSError):  # includes ConnectionError, TimeoutError, PermissionError
        return True
    return any(code in str(e) for code in _TRANSIENT_CODES)


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes_by_path(tree: Any) -> dict:
    """``{'params/conv/kernel': shape}`` for every array-like leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


def tree_differences(
    saved: Any, target: Any, *, only: Optional[Sequence[str]] = None, limit: int = 20
) -> List[str]:
    """What differs between a saved tree (Orbax metadata) and the ``target`` abstract tree.

    Compares leaf paths (``opt_state/1/mu/...``) and shapes; with ``only``, just the subtrees whose
    first path element is in ``only``. Returns one line per difference (at most ``limit``, then a
    count), empty when the trees match.
    """
    a, b = _shapes_by_path(saved), _shapes_by_path(target)
    if only is not None:
        keep = lambda d: {k: v for k, v in d.items() if k.split("/")[0] in only}  # noqa: E731
        a, b = keep(a), keep(b)
    lines = []
    for what, keys, shapes in (
        ("in the checkpoint, not built by this config", a.keys() - b, a),
        ("built by this config, not in the checkpoint", b.keys() - a, b),
    ):
        groups: dict = {}
        for k in sorted(keys):  # one line per subtree (first two path parts), with a count
            groups.setdefault("/".join(k.split("/")[:2]), []).append(k)
        for g, ks in groups.items():
            lines.append(
                f"{what}: {ks[0]} {shapes[ks[0]]}"
                if len(ks) == 1
                else f"{what}: {g}/... ({len(ks)} arrays)"
            )
    lines += [
        f"shape differs: {k} saved {a[k]}, now {b[k]}" for k in sorted(a.keys() & b) if a[k] != b[k]
    ]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


class _Unreadable(Exception):
    """Internal: the step's data cannot be decoded (quarantine it)."""


class Checkpointer:
    """Saves and restores ``(TrainState, config dict)`` pairs in ``directory``.

    ``retry_delays``: seconds to wait before each retry of a transient read error (the number of
    retries is its length). ``save_timeout_s``: the longest one asynchronous save may run before
    `poll` / `save` give up on it (`StorageTimeoutError`); ``close_timeout_s``: the longest `close`
    waits for a running save.
    """

    retry_delays: Tuple[float, ...] = (2.0, 8.0, 30.0)
    #: How often a bounded wait re-checks whether the save finished (seconds).
    poll_interval_s: float = 0.05
    #: A failed local save's partial files are removed up to this many times, this many seconds
    #: apart, until they stay gone (writes still in flight can recreate them).
    cleanup_passes: int = 10
    cleanup_quiet_s: float = 0.5

    def __init__(
        self,
        directory: str,
        *,
        keep_every: Optional[int] = None,
        max_to_keep: int = 2,
        async_save: bool = True,
        retry_delays: Optional[Iterable[float]] = None,
        save_timeout_s: float = 300.0,
        close_timeout_s: float = 30.0,
    ):
        directory = io.absolute(str(directory))  # Orbax needs absolute paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            keep_period=keep_every,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.directory = str(directory)
        if retry_delays is not None:
            self.retry_delays = tuple(retry_delays)
        self.save_timeout_s = float(save_timeout_s)
        self.close_timeout_s = float(close_timeout_s)
        #: The newest step known to be saved completely (set by `save` / `poll` and by
        #: `restore_latest`; the training loop may set it at start).
        self.last_good: Optional[int] = None
        self._pending: Optional[Tuple[int, float]] = None  # (step, monotonic start) of a save
        self._broken = False  # a save failed or hung: close() must not wait on Orbax again
        # Handlers named up front, so that the saved tree's metadata can be read before any save.
        self.manager = ocp.CheckpointManager(
            directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def quarantine_directory(self) -> str:
        """Where unreadable steps are moved: ``<directory>_corrupt``."""
        return self.directory.rstrip("/") + "_corrupt"

    def all_steps(self):
        """Steps of the complete checkpoints on disk, ascending."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def quarantined(self) -> List[str]:
        """Names of the steps moved to the quarantine directory (``<step>-<time>``)."""
        q = self.quarantine_directory
        return io.listdir(q) if io.isdir(q) else []

    def save(
        self,
        step: int,
        state: Any,
        config_dict: dict,
        *,
        force: bool = True,
        should_abort: Optional[Callable[[], bool]] = None,
    ) -> bool:
        """Starts saving ``state`` and ``config_dict`` at ``step`` (asynchronously); every process
        calls it. First waits (bounded) for the previous save and raises its failure, so a failed
        save is never followed by another; a save that cannot even start raises
        `CheckpointSaveError`. `poll` / `wait` report how it ends."""
        self.wait(should_abort=should_abort)
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(saved_form(state)),
                    config=ocp.args.JsonSave(config_dict),
                ),
                force=force,
            )
        except Exception as e:  # noqa: BLE001 - classified into CheckpointSaveError
            self._broken = True
            raise self._save_error(step, e) from e
        if saved:
            self._pending = (step, time.monotonic())
            self.poll()  # a synchronous save has ended already
        return saved

    def poll(self) -> Optional[int]:
        """Checks the save in flight without blocking (call it after every train step).

        Returns the step of a save that has just completed (then `last_good`), else None.
        Raises `CheckpointSaveError` if it failed (its temporary directory removed) and
        `StorageTimeoutError` if it has run longer than ``save_timeout_s``."""
        if self._pending is None:
            return None
        step, started = self._pending
        if self.manager.is_saving_in_progress():
            if time.monotonic() - started > self.save_timeout_s:
                self._broken = True
                raise self._timeout_error(step, time.monotonic() - started)
            return None
        self._pending = None
        try:
            self.manager.wait_until_finished()  # returns at once; raises the save's error
            if not io.exists(self._step_dir(step)):  # Orbax logs some failures and goes on
                raise OSError(
                    f"the save ended without error but {self._step_dir(step)} was not written"
                )
        except Exception as e:  # noqa: BLE001 - classified into CheckpointSaveError
            self._broken = True
            raise self._save_error(step, e) from e
        self.last_good = step
        return step

    def wait(
        self,
        timeout_s: Optional[float] = None,
        *,
        should_abort: Optional[Callable[[], bool]] = None,
    ) -> Optional[int]:
        """Blocks until the save in flight ends, at most ``timeout_s`` (default: what is left of
        ``save_timeout_s``) or until ``should_abort()`` is true; then as `poll`. Raises
        `StorageTimeoutError` when the time runs out or it is aborted."""
        if self._pending is None:
            return None
        step, started = self._pending
        deadline = (
            started + self.save_timeout_s if timeout_s is None else time.monotonic() + timeout_s
        )
        while self.manager.is_saving_in_progress():
            if time.monotonic() > deadline or (should_abort is not None and should_abort()):
                self._broken = True
                raise self._timeout_error(step, time.monotonic() - started)
            time.sleep(self.poll_interval_s)
        return self.poll()

    def _step_dir(self, step: int) -> str:
        return f"{self.directory.rstrip('/')}/{step}"

    def _partial_paths(self, step: int) -> List[str]:
        """Where a save of ``step`` that did not complete leaves files: Orbax writes a local step
        into ``<step>.orbax-checkpoint-tmp*`` and renames it when complete; on an object store
        (no rename) it writes ``<step>/`` in place and adds ``commit_success.txt`` last."""
        base = self.directory.rstrip("/")
        names = [n for n in io.listdir(self.directory) if n.startswith(f"{step}.orbax-")]
        paths = [f"{base}/{n}" for n in names]
        step_dir = self._step_dir(step)
        if io.is_remote(base) and io.exists(step_dir):
            if not io.exists(f"{step_dir}/commit_success.txt"):
                paths.append(step_dir)
        return paths

    def _remove_temporaries(self, step: int, unreachable: bool) -> List[str]:
        """Removes the partial files of a failed save of ``step`` (process 0); returns what could
        not be removed, as paths or patterns for the message. With ``unreachable`` (the storage
        does not answer) nothing is tried: each request would only wait for its retries."""
        if jax.process_index() != 0:
            return []
        pattern = (
            self._step_dir(step) + "/"
            if io.is_remote(self.directory)
            else f"{self._step_dir(step)}.orbax-checkpoint-tmp*"
        )
        if unreachable:
            return [pattern]
        # Writes of the failed save that were still in flight can recreate files after a removal
        # (TensorStore goes on with the other arrays when one fails): remove until the paths
        # stay gone for a quiet period, within a bounded time (local storage; one pass remote).
        passes = 1 if io.is_remote(self.directory) else self.cleanup_passes
        left: List[str] = []
        for i in range(passes):
            try:
                paths = self._partial_paths(step)
            except Exception:  # noqa: BLE001 - the storage itself is failing
                return [pattern]
            if not paths and i > 0:
                break
            left = []
            for p in paths:
                try:
                    io.rmtree(p)
                except Exception:  # noqa: BLE001 - reported to the user instead
                    left.append(p)
            if i + 1 < passes:
                time.sleep(self.cleanup_quiet_s)
        else:
            left = left or self._partial_paths(step)
        return left

    def _last_good_text(self) -> str:
        if self.last_good is None:
            return f"No earlier checkpoint exists in {self.directory}"
        return f"The last good checkpoint, step {self.last_good}, is untouched in {self.directory}"

    def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
        what, fix = storage_problem(e)
        left = self._remove_temporaries(step, unreachable=what == "storage unavailable")
        tmp = (
            f" Its partial files could not be removed: delete {', '.join(left)} (or let the "
            "next launch remove them)."
            if left
            else " Its partial files were removed."
        )
        return CheckpointSaveError(
            f"Could not save the checkpoint at step {step} ({what}; {_one_line(e)}). "
            f"{self._last_good_text()}.{tmp} Fix: {fix}, then relaunch the same command to "
            "resume from it."
        )

    def _timeout_error(self, step: int, seconds: float) -> StorageTimeoutError:
        return StorageTimeoutError(
            f"The checkpoint save at step {step} did not finish within {seconds:.0f} s "
            f"(storage unreachable or far too slow; bound: save_timeout_s="
            f"{self.save_timeout_s:.0f}). {self._last_good_text()}. Partial files may remain "
            f"under {self._step_dir(step)}*; the next launch removes them. Fix: check the "
            "network and the bucket or file system (or raise --config.training.save_timeout_s "
            "for very large checkpoints on slow storage), then relaunch the same command to "
            "resume."
        )

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        """Restores the checkpoint at ``step`` into the structure/shardings of ``abstract_state``."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(saved_form(abstract_state)),
                config=ocp.args.JsonRestore(),
            ),
        )
        return restored_form(out["state"], abstract_state), out["config"]

    def restore_config(self, step: int) -> dict:
        """Only the config saved with ``step``."""
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]

    def saved_tree(self, step: int) -> Any:
        """The saved state's tree of array metadata (shapes, dtypes) at ``step``; reads no arrays."""
        md = self.manager.item_metadata(step)["state"]
        return getattr(md, "tree", md)

    def restore_params_only(self, step: int, sharding=None) -> dict:
        """``{'step', 'params', 'ema_params'}`` of ``step`` as saved, whatever its optimizer state."""

        def leaf(m):
            return (
                jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)
                if hasattr(m, "shape")
                else m
            )

        abstract = jax.tree.map(leaf, self.saved_tree(step))
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )["state"]
        return {k: out[k] for k in PARAMS_ONLY}

    # ------------------------------------------------------------------ resume
    def _read(self, step: int, what: str, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` with retries for transient errors; raises `CheckpointReadError` when they
        persist, `CheckpointIncompatibleError` for a tree mismatch, `_Unreadable` otherwise."""
        attempts = len(self.retry_delays) + 1
        for attempt in range(attempts):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - classified below
                if any(w in str(e) for w in _MISMATCH_WORDS):
                    raise CheckpointIncompatibleError(
                        f"The checkpoint at step {step} in {self.directory} holds a different tree "
                        f"than this config builds ({str(e)[:500]})"
                    ) from e
                if not is_transient_error(e):
                    raise _Unreadable(f"{type(e).__name__}: {str(e)[:300]}") from e
                if attempt + 1 == attempts:
                    raise CheckpointReadError(
                        f"Could not read the {what} of the checkpoint at step {step} in "
                        f"{self.directory} after {attempts} attempts ({type(e).__name__}: "
                        f"{str(e)[:300]}). It was not moved or changed. Check the file system or "
                        "bucket (network, permissions), then relaunch the same command to resume."
                    ) from e
                delay = self.retry_delays[attempt]
                logging.warning(
                    "Reading the %s of checkpoint step %d failed (%s: %s); retrying in "
                    "%.0f s (attempt %d of %d).",
                    what,
                    step,
                    type(e).__name__,
                    str(e)[:200],
                    delay,
                    attempt + 2,
                    attempts,
                )
                time.sleep(delay)

    def restore_latest(
        self,
        abstract_state: Any,
        *,
        params_only: bool = False,
        config_differences: Optional[Callable[[dict], List[str]]] = None,
        how_to_proceed: str = "",
    ) -> Optional[Tuple[Any, dict, int]]:
        """The newest checkpoint that restores, as ``(state, config_dict, step)``; None when the
        directory never held a checkpoint.

        ``config_differences(saved_config) -> [lines]`` names config fields that make the saved
        tree differ (checked first, from the small JSON config); then the saved tree's paths and
        shapes are compared with ``abstract_state``. Any difference raises
        `CheckpointIncompatibleError` (with ``how_to_proceed`` appended) and moves nothing. With
        ``params_only`` only ``step``, ``params`` and ``ema_params`` must match, and the result is
        the dict of those three (the caller builds a new optimizer state).

        Transient read errors are retried (`retry_delays`), then raise `CheckpointReadError`.
        A step whose data cannot be decoded is quarantined and the next older one tried; if none
        is left, `NoRestorableCheckpointError`.
        """
        steps = self.all_steps()
        if not steps:
            old = self.quarantined()
            if old:
                raise NoRestorableCheckpointError(
                    f"{self.directory} has no usable checkpoint, but earlier launches moved "
                    f"unreadable ones to {self.quarantine_directory} ({', '.join(old)}). Refusing "
                    "to start again from step 0 here: inspect or restore those, or use a new "
                    "--workdir to start over."
                )
            return None
        moved = []
        for step in reversed(steps):
            try:
                saved_config = self._read(step, "config", lambda: self.restore_config(step))
                diffs = list(config_differences(saved_config)) if config_differences else []
                saved_tree = self._read(step, "tree metadata", lambda: self.saved_tree(step))
                tree_diffs = tree_differences(
                    saved_tree,
                    saved_form(abstract_state),
                    only=PARAMS_ONLY if params_only else None,
                )
                if diffs or tree_diffs:
                    lines = [f"config: {d}" for d in diffs] + [f"tree: {d}" for d in tree_diffs]
                    raise CheckpointIncompatibleError(
                        f"The checkpoint at step {step} in {self.directory} does not match what "
                        "this config builds; nothing was moved or changed. Differences:\n  - "
                        + "\n  - ".join(lines)
                        + ("\n" + how_to_proceed if how_to_proceed else "")
                    )
                if params_only:
                    sharding = (
                        jax.tree.leaves(abstract_state)[0].sharding
                        if jax.tree.leaves(abstract_state)
                        else None
                    )
                    state = self._read(
                        step, "parameters", lambda: self.restore_params_only(step, sharding)
                    )
                else:
                    state, _ = self._read(step, "state", lambda: self.restore(step, abstract_state))
                self.last_good = step
                return state, saved_config, step
            except CheckpointIncompatibleError as e:
                if how_to_proceed and how_to_proceed not in str(e):
                    raise CheckpointIncompatibleError(f"{e}\n{how_to_proceed}") from e
                raise
            except _Unreadable as e:
                where = self._quarantine(step)
                moved.append(f"step {step} -> {where}")
                logging.error(
                    "Checkpoint at step %d in %s is unreadable (%s); moved it to %s and "
                    "trying an older one.",
                    step,
                    self.directory,
                    e,
                    where,
                )
        raise NoRestorableCheckpointError(
            f"None of the checkpoints in {self.directory} could be restored; the unreadable ones "
            f"were moved aside (never deleted): {'; '.join(moved)}. Refusing to start again from "
            "step 0: inspect those, or use a new --workdir to start over."
        )

    def _quarantine(self, step: int) -> str:
        """Moves the step directory to ``<directory>_corrupt/<step>-<time>`` (process 0 moves,
        all processes wait), then re-reads the manager's view of the directory. Works on local
        paths and object stores (``gs://``: copy, then delete; see `diffusion.io.move`)."""
        src = f"{self.directory.rstrip('/')}/{step}"
        dst = f"{self.quarantine_directory}/{step}-{int(time.time())}"
        if jax.process_index() == 0 and io.exists(src):
            io.move(src, dst)
        parallel.wait_for_all_processes(f"quarantine_{step}")  # a gs:// move can take a while
        self.manager.reload()
        return dst

    def close(
        self, *, after_error: bool = False, should_abort: Optional[Callable[[], bool]] = None
    ) -> None:
        """Waits for the save in flight, then releases the manager. The wait is bounded by what
        is left of ``save_timeout_s``, or with ``after_error`` (the caller is stopping because of
        another error) by ``close_timeout_s``; it also ends when ``should_abort()`` is true. After
        a failed or hung save only what does not wait on storage is released. Raises the save's
        `CheckpointSaveError` / `StorageTimeoutError`."""
        try:
            if not self._broken and self._pending is not None:
                self.wait(self.close_timeout_s if after_error else None, should_abort=should_abort)
        finally:
            if not self._broken:
                self.manager.close()
