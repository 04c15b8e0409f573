"""The resumable results store and the cached per-step files of an evaluation.

``<workdir>/eval/results.json`` holds one entry per checkpoint step; each metric in it stores the
settings it was computed with, so a rerun skips a metric whose settings match and an interrupted
run loses at most the metric in progress (the file is rewritten atomically after each metric).
A metric recomputed with other settings (e.g. another N) moves the old value to
``entry['previous']`` instead of losing it. Cached samples and features are NPZ files that are
reused only when their shape / settings match. Multi-process runs decide together (every process
must take the same collective path).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np

from diffusion import io, parallel

__all__ = [
    "ResultsStore",
    "load_npz",
    "load_features",
    "all_processes",
    "from_process_0",
    "settings_match",
]


class ResultsStore:
    """``{str(step): entry}`` read from / written to ``path`` (process 0 only)."""

    def __init__(self, path: str, *, main: bool):
        self.path, self.main = path, main
        self.results: Dict[str, Any] = io.read_json(path, default={}) if main else {}

    def entry(self, step: int) -> dict:
        return self.results.setdefault(str(step), {})

    def save(self) -> None:
        if self.main:
            io.write_json(self.path, self.results, indent=1, sort_keys=True)

    @staticmethod
    def keep_previous(entry: dict, keys) -> None:
        """Moves metrics computed with other settings (e.g. another N) to ``entry['previous']``
        instead of losing them (``keys[0]`` is the metric; the others are its companions)."""
        old = {k: entry.pop(k) for k in keys if k in entry}
        if keys[0] in old:
            entry.setdefault("previous", []).append(old)


def settings_match(entry: Optional[dict], settings: dict) -> bool:
    """True when a stored metric ``entry`` was computed with exactly ``settings``."""
    return bool(entry) and entry.get("settings") == settings


def load_npz(path: str, key: str, shape, dtype) -> Optional[np.ndarray]:
    """``path[key]`` if it exists and has ``shape``/``dtype``; None otherwise (recompute)."""
    if not io.isfile(path):
        return None
    try:
        a = io.read_npz(path, keys=[key])[key]
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file means: recompute
        logging.warning("Ignoring unreadable %s (%s)", path, e)
        return None
    if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
        logging.warning("Ignoring %s: %s %s, expected %s %s", path, a.shape, a.dtype, shape, dtype)
        return None
    return a


def load_features(
    path: str, network: str, n: int, seed: int, need_logits: bool = False
) -> Optional[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """Cached ``(features [n, d], logits [n, k] or None)`` of this process's samples if they match
    (network, N, seed, and logits present when ``need_logits``), else None."""
    if not io.isfile(path):
        return None
    try:
        z = io.read_npz(path)
        if str(z["network"]) == network and len(z["features"]) == n and int(z["seed"]) == seed:
            logits = z.get("logits")
            if need_logits and logits is None:
                return None
            return z["features"], logits
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file means: recompute
        logging.warning("Ignoring unreadable %s (%s)", path, e)
    return None


def all_processes(flag: bool) -> bool:
    """True when ``flag`` holds on every process (all take the same collective path)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    parallel.wait_for_all_processes("all_processes")
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def from_process_0(flags: List[bool]) -> List[bool]:
    """Process 0's ``flags`` on every process (process 0 alone reads results.json)."""
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    parallel.wait_for_all_processes("from_process_0")  # process 0 read results.json first
    got = multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32))
    return [bool(v) for v in np.asarray(got)]


def gather(x: np.ndarray) -> np.ndarray:
    """Every process's rows of ``x`` ``[n_local, ...]`` concatenated in process order."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    parallel.wait_for_all_processes("gather")  # sampling/feature extraction end unevenly
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
