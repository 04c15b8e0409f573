"""Samples from a checkpoint's EMA parameters with the configured sampler, in global batches
sharded over the mesh (`sample_in_batches`: the tens of thousands of samples FID needs, over
several devices and processes). The noise is the `rng.EVAL_SAMPLES` stream, the same for every
checkpoint, so grids and metrics of different steps are comparable."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from diffusion import factories, rng, samplers, sampling

__all__ = ["make_sample_fn", "batch_for", "generate_samples", "sample_in_batches"]


def make_sample_fn(config, model, params, spec: Optional[samplers.SamplerSpec] = None) -> Callable:
    """``sample_fn(key, n) -> [n, H, W, C]`` float32 in [−1, 1] from ``params`` with ``spec``
    (default `samplers.spec_from_config`: ``config.sample``)."""
    spec = spec or samplers.spec_from_config(config)
    param = factories.parameterization(config)
    schedule = factories.schedule_from_config(config)
    s, c = config.data.image_size, config.data.channels
    denoise_fn = factories.make_denoise_fn(model, params)

    def sample_fn(key, n):
        return samplers.draw(spec, schedule, denoise_fn, (n, s, s, c), key, param).x

    return sample_fn


def batch_for(n_global: int, batch_size: int, num_devices: int) -> int:
    """The global batch: ``batch_size``, or less when n is smaller (a multiple of the devices)."""
    return min(batch_size, max(1, math.ceil(n_global / num_devices)) * num_devices)


def generate_samples(
    config, model, params, num_samples: int, *, mesh, spec: Optional[samplers.SamplerSpec] = None
) -> np.ndarray:
    """This process's share of ``num_samples`` uint8 samples ``[N_local, H, W, C]`` drawn with
    ``spec`` (default: ``config.sample``) in global batches of ``config.eval.batch_size`` on
    ``mesh``."""
    key = rng.stream(config.seed, rng.EVAL_SAMPLES)
    batch = batch_for(num_samples, config.eval.batch_size, int(mesh.devices.size))
    return sample_in_batches(
        make_sample_fn(config, model, params, spec),
        num_samples,
        batch // jax.process_count(),
        key,
        mesh=mesh,
        as_uint8=True,
    )


# ----------------------------------------------------------------------------- many samples
def _local_rows(arr) -> np.ndarray:
    """This process's rows of a batch-sharded array, in batch order, as NumPy."""
    if arr.is_fully_addressable:
        return np.asarray(arr)
    shards = {}
    for s in arr.addressable_shards:
        start = s.index[0].start or 0
        shards.setdefault(start, s.data)  # replicas along other mesh axes: keep one
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def _batch_plan(num_samples: int, batch_size: int, mesh: Optional[Mesh]) -> Tuple[int, int, bool]:
    """``(n_local, global_batch, global_mesh)``: this process's share, the batch drawn per step
    by all processes together, and whether ``mesh`` spans several processes. ValueError when a
    count is not positive or ``num_samples`` does not divide over the processes."""
    pcount = jax.process_count()
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be positive, got {num_samples}, {batch_size}"
        )
    if num_samples % pcount:
        raise ValueError(
            f"num_samples={num_samples} must be divisible by the process count {pcount}"
        )
    global_mesh = mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1
    return num_samples // pcount, batch_size * pcount if global_mesh else batch_size, global_mesh


def _compiled_batch(
    sample_fn: Callable, global_batch: int, batch_size: int, mesh: Optional[Mesh], as_uint8: bool
) -> Tuple[Callable, Callable]:
    """``(run, put_key)``: ``run(key) -> [global_batch, ...]`` jitted (sharded along the mesh's
    'data' axis when there is a mesh) and the placement of a key for it (replicated)."""

    def fn(k):
        x = sample_fn(k, global_batch)
        return sampling.to_uint8(x) if as_uint8 else x.astype(jnp.float32)

    if mesh is None:
        return jax.jit(fn), lambda k: k
    if "data" not in mesh.axis_names:
        raise ValueError(f"mesh must have a 'data' axis, got axes {mesh.axis_names}")
    n_data = mesh.shape["data"]
    if global_batch % n_data:
        raise ValueError(
            f"batch_size={batch_size} (global batch {global_batch}) must be "
            f"divisible by the mesh's 'data' axis size {n_data}"
        )
    replicated = NamedSharding(mesh, P())
    return (
        jax.jit(fn, out_shardings=NamedSharding(mesh, P("data"))),
        lambda k: jax.device_put(k, replicated),
    )


class _Progress:
    """Progress of ``n_local`` images in ``n_batches`` batches on stderr (tqdm if installed, else
    one line per batch with the ETA); silent when ``show`` is false."""

    def __init__(self, show: bool, n_local: int, n_batches: int, batch_size: int):
        self.show, self.n_local, self.n_batches, self.batch_size = (
            show,
            n_local,
            n_batches,
            batch_size,
        )
        self.bar, self.t0 = None, time.time()
        if show:
            try:
                from tqdm.auto import tqdm  # optional

                self.bar = tqdm(total=n_local, desc="sampling", unit="img", file=sys.stderr)
            except ImportError:
                self.bar = None

    def update(self, i: int, rows: int) -> None:
        if self.bar is not None:
            self.bar.update(min(rows, self.n_local - i * self.batch_size))
        elif self.show:
            done = min((i + 1) * self.batch_size, self.n_local)
            el = time.time() - self.t0
            eta = el / done * (self.n_local - done)
            print(
                f"sampling: batch {i + 1}/{self.n_batches}, {done}/{self.n_local} images, "
                f"{el:.1f}s elapsed"
                + (f", ETA {eta:.0f}s" if done < self.n_local else ", done")
                + (" (the first batch includes compiling the chain)" if i == 0 else ""),
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def sample_in_batches(
    sample_fn: Callable,
    num_samples: int,
    batch_size: int,
    key,
    *,
    mesh: Optional[Mesh] = None,
    as_uint8: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Draws ``num_samples`` samples in batches, optionally sharded over a device mesh.

    ``sample_fn(key, n) -> [n, ...]`` float samples in [−1, 1] (``n`` a static Python int), e.g.
    ``lambda k, n: ancestral_sample(sched, fn, (n, 32, 32, 3), k, mean_type=..., var_type=...)``.
    It is jitted once; batch i uses ``fold_in(fold_in(key, p), i)`` with p = `jax.process_index()`,
    so processes draw different samples and the result does not depend on the number of devices.

    With ``mesh`` (a `jax.sharding.Mesh` with a ``'data'`` axis) each batch's output is sharded
    along 'data' with ``NamedSharding(mesh, P('data'))`` and XLA partitions the chain over the
    devices (the random draws are partition-invariant, so 1 and N devices give the same samples).
    If the mesh spans several processes, one global batch of ``batch_size · process_count`` is drawn
    per step by all processes together (key folded with p = 0 on all of them) and each process keeps
    its addressable rows. The (global) batch must be divisible by the 'data' axis size.

    Each process returns its ``num_samples / process_count`` samples (ValueError if not divisible)
    as NumPy ``[N_local, ...]``: uint8 via `sampling.to_uint8` (``as_uint8``) or float32. The last
    batch is computed in full and truncated. Progress goes to stderr on process 0 (tqdm if
    installed).
    """
    num_samples, batch_size = int(num_samples), int(batch_size)
    n_local, global_batch, global_mesh = _batch_plan(num_samples, batch_size, mesh)
    base_key = jax.random.fold_in(key, 0 if global_mesh else jax.process_index())
    run, put_key = _compiled_batch(sample_fn, global_batch, batch_size, mesh, as_uint8)
    n_batches = math.ceil(n_local / batch_size)
    bar = _Progress(progress and jax.process_index() == 0, n_local, n_batches, batch_size)
    out = []
    for i in range(n_batches):
        rows = _local_rows(run(put_key(jax.random.fold_in(base_key, i))))
        out.append(rows)
        bar.update(i, len(rows))
    bar.close()
    return np.concatenate(out, axis=0)[:n_local]
