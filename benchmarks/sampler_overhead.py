"""How much does the lax.scan ancestral sampler add on top of the network? (a benchmark, not a test)

Times, at the same batch and image size:
  * the bare jitted network forward ``model.apply(variables, x, t, train=False)``;
  * `diffusion.sampling.ancestral_sample` (one jitted lax.scan over ``--steps`` steps), per step;
and prints the per-step overhead (p_mean_variance, the noise draw, the scan carry) in percent.
Each timing is the median of ``--repeats`` runs after one warm-up; compile time is reported apart.

The network is the project's DDPM U-Net (``diffusion.models.get_model``) in a small configuration
if that package imports, else a small Flax conv net with a timestep embedding.

    python benchmarks/sampler_overhead.py                 # small U-Net, 16×16×3, batch 8, 50 steps
    python benchmarks/sampler_overhead.py --size 32 --ch 64 --batch 16 --steps 100
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from diffusion import sampling  # noqa: E402
from diffusion.schedules import make_schedule  # noqa: E402


class _SmallConvNet(nn.Module):
    """Fallback network: 3 convs with a sinusoidal timestep embedding added in the middle."""

    ch: int
    out_ch: int

    @nn.compact
    def __call__(self, x, t, *, train: bool = False):
        half = self.ch // 2
        freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / max(half - 1, 1))
        emb = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = nn.Dense(self.ch)(jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], -1))
        h = nn.swish(nn.Conv(self.ch, (3, 3))(x))
        h = h + emb[:, None, None, :]
        h = nn.swish(nn.Conv(self.ch, (3, 3))(h))
        return nn.Conv(self.out_ch, (3, 3))(h)


def build_model(ch: int, out_ch: int, size: int):
    try:
        from diffusion.models import get_model
    except Exception as e:  # pylint: disable=broad-except
        print(
            f"diffusion.models not importable ({type(e).__name__}: {e}); "
            f"using a small Flax conv net"
        )
        return _SmallConvNet(ch=ch, out_ch=out_ch), "fallback conv net"
    cfg = dict(
        name="ddpm_unet",
        ch=ch,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(size // 2,),
        dropout=0.0,
    )
    return get_model(cfg, out_ch=out_ch), f"DDPM U-Net {cfg}"


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--ch", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="T of the schedule sampled over")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--var_type", default="fixedlarge")
    args = p.parse_args(argv)

    shape = (args.batch, args.size, args.size, args.channels)
    model, name = build_model(args.ch, args.channels, args.size)
    x = jnp.zeros(shape, jnp.float32)
    t = jnp.zeros((args.batch,), jnp.int32)
    variables = model.init(jax.random.key(0), x, t, train=False)
    n_params = sum(v.size for v in jax.tree_util.tree_leaves(variables))
    sched = make_schedule(
        "linear",
        beta_start=1e-4 * 1000 / args.steps,
        beta_end=0.02 * 1000 / args.steps,
        num_timesteps=args.steps,
    )

    def denoise_fn(x_t, t_):
        return model.apply(variables, x_t, t_, train=False)

    fwd = jax.jit(denoise_fn)
    sample = jax.jit(
        functools.partial(
            sampling.ancestral_sample,
            sched,
            denoise_fn,
            shape,
            mean_type="eps",
            var_type=args.var_type,
        )
    )
    xr = jax.random.normal(jax.random.key(1), shape)
    tr = jnp.full((args.batch,), args.steps // 2, jnp.int32)
    key = jax.random.key(2)

    t0 = time.perf_counter()
    fwd_c = fwd.lower(xr, tr).compile()
    t1 = time.perf_counter()
    sample_c = sample.lower(key).compile()
    t2 = time.perf_counter()
    jax.block_until_ready(fwd_c(xr, tr))  # warm-up
    jax.block_until_ready(sample_c(key))

    f_med, f_min, f_max = _median_time(lambda: fwd_c(xr, tr), args.repeats * 4)
    s_med, s_min, s_max = _median_time(lambda: sample_c(key), args.repeats)
    per_step = s_med / args.steps
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{len(jax.devices())} device(s)"
    )
    print(f"network: {name}; {n_params:,} parameters")
    print(
        f"batch {shape}, T = {args.steps} steps, var_type={args.var_type}, "
        f"repeats: forward {args.repeats * 4}, sampler {args.repeats}"
    )
    print(f"compile: forward {t1 - t0:.2f} s, sampler (whole scan) {t2 - t1:.2f} s")
    print(
        f"forward  : median {f_med * 1e3:8.3f} ms  (min {f_min * 1e3:.3f}, max {f_max * 1e3:.3f})"
    )
    print(
        f"sampler  : median {s_med * 1e3:8.3f} ms for {args.steps} steps "
        f"(min {s_min * 1e3:.3f}, max {s_max * 1e3:.3f})"
    )
    print(
        f"per step : {per_step * 1e3:8.3f} ms  vs forward {f_med * 1e3:.3f} ms  ->  overhead "
        f"{100.0 * (per_step - f_med) / f_med:+.1f} % (medians); "
        f"{100.0 * (s_min / args.steps - f_min) / f_min:+.1f} % (fastest runs)"
    )


if __name__ == "__main__":
    main()
