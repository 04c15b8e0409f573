"""Devices, meshes, shardings and multi-host set-up.

One data-parallel mesh ``Mesh(devices, ('data',))`` over every device of every process: batches
are sharded on 'data', parameters and optimizer state replicated. The same code runs on one CPU,
one GPU and a multi-host TPU pod; on one machine a real multi-process run uses CPU devices and
gloo collectives (see tests/test_train.py::test_two_processes_with_gloo_equal_one_device).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "maybe_initialize_distributed",
    "make_mesh",
    "replicated_sharding",
    "batch_sharding",
    "global_batch_from_local",
    "is_main_process",
    "wait_for_all_processes",
]


def maybe_initialize_distributed(
    *,
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    initialization_timeout: int = 300,
    heartbeat_timeout_seconds: Optional[int] = None,
) -> bool:
    """Initialises ``jax.distributed`` when this is a multi-process run; returns whether it did.

    Explicit arguments (or the env vars DDPM_COORDINATOR, DDPM_NUM_PROCESSES, DDPM_PROCESS_ID)
    start a multi-process run anywhere (several GPU hosts, or CPU processes on one machine with
    gloo collectives). On a Cloud TPU pod slice (TPU_WORKER_HOSTNAMES lists >1 host) JAX finds
    everything itself. Otherwise nothing happens (single process).

    If a process dies, the others notice through the coordination service's missed heartbeats
    and terminate after ``heartbeat_timeout_seconds`` (env DDPM_HEARTBEAT_TIMEOUT; JAX's default
    is 100 s) instead of hanging in a collective; relaunching all processes resumes the run.
    """
    if heartbeat_timeout_seconds is None:
        heartbeat_timeout_seconds = int(os.environ.get("DDPM_HEARTBEAT_TIMEOUT", "100"))
    coordinator_address = coordinator_address or os.environ.get("DDPM_COORDINATOR")
    if num_processes is None and os.environ.get("DDPM_NUM_PROCESSES"):
        num_processes = int(os.environ["DDPM_NUM_PROCESSES"])
    if process_id is None and os.environ.get("DDPM_PROCESS_ID"):
        process_id = int(os.environ["DDPM_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                "A multi-process run needs coordinator_address, num_processes and "
                "process_id (flags --coordinator_address/--num_processes/--process_id "
                "or env DDPM_COORDINATOR/DDPM_NUM_PROCESSES/DDPM_PROCESS_ID)"
            )
        # CPU devices need gloo for cross-process collectives; harmless for GPU/TPU backends.
        # (Asking jax.default_backend() here would initialise XLA before distributed init.)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        )
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        return True
    return False


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices).reshape(-1), ("data",))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, keys)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over 'data'."""
    return NamedSharding(mesh, P("data"))


def global_batch_from_local(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles per-process host arrays ``[B_local, ...]`` into global jax Arrays ``[B, ...]``
    (B = B_local · process_count) sharded over 'data' (``jax.make_array_from_process_local_data``).

    On CPU devices with synchronous dispatch (``jax_cpu_enable_async_dispatch=False``, which
    ``DDPM_KEEP_FREED_MEMORY=sync`` sets) it returns only once the arrays are copied in.
    XLA CPU copies a host array of 100 KB or more that is not 64-byte aligned on a worker
    thread, and a computation called with an input still being copied is not run inline but
    queued for a pool thread: there its temporaries come from that thread's heap, i.e. a fresh
    ``mmap`` of the whole block (a ~2.2 GB spike of the CIFAR10 train step at batch 32, see
    diffusion/cpu_runtime.py), and the call returns before the step has run."""
    sharding = batch_sharding(mesh)
    n = mesh.devices.size
    leaves = jax.tree.leaves(local_batch)
    global_b = leaves[0].shape[0] * jax.process_count()
    if global_b % n:
        raise ValueError(
            f"The global batch {global_b} must be divisible by the number of devices "
            f"{n}: set --config.training.batch_size to a multiple of {n}"
        )
    batch = jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
    if _cpu_dispatch_is_synchronous(mesh):
        jax.block_until_ready(batch)
    return batch


def _cpu_dispatch_is_synchronous(mesh: Mesh) -> bool:
    """True if ``mesh`` is CPU devices and JAX runs CPU computations inline (synchronously)."""
    return mesh.devices.flat[0].platform == "cpu" and not jax.config.read(
        "jax_cpu_enable_async_dispatch"
    )


def is_main_process() -> bool:
    """True on process 0 (the one that logs and writes images)."""
    return jax.process_index() == 0


def wait_for_all_processes(name: str, timeout_s: Optional[float] = None) -> None:
    """Blocks until every process has reached the barrier ``name``; nothing with one process.

    The barrier goes through JAX's coordination service (TCP to the coordinator), not through a
    device collective, so it waits as long as ``timeout_s`` allows (default: env
    DDPM_BARRIER_TIMEOUT, else 1800 s). Call it before the first collective of a program when
    the processes may arrive at different times (after compiling, sampling or reading files):
    XLA's CPU (gloo) collectives give up after 30 s when a peer has not yet joined the first
    collective on a set of devices ("Gloo context initialization failed: ... GetKeyValue()
    timed out"), which a skew in compile time on a loaded machine exceeds. All processes must
    call it with the same names in the same order.
    """
    if jax.process_count() == 1:
        return
    # JAX has no public handle on its distributed client; Orbax reaches it the same way.
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            f"{jax.process_count()} processes but no jax.distributed client: call "
            "diffusion.parallel.maybe_initialize_distributed() before anything else touches JAX"
        )
    if timeout_s is None:
        timeout_s = float(os.environ.get("DDPM_BARRIER_TIMEOUT", "1800"))
    client.wait_at_barrier(f"ddpm:{name}", int(timeout_s * 1000))
