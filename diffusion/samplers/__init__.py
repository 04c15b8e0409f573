"""The sampler layer: one `SamplerSpec` (``config.sample``), a registry of `Sampler` objects, and
`draw`, the one entry point every use goes through (``--mode sample``, ``--mode evaluate``, the
training grid, ``experiments/reproduce.py``, the benchmarks).

Modules (one job each):
  base        `SamplerSpec`, `SampleResult`, the `Sampler` interface, the registry
  config      ``config.sample`` -> spec, the training grid's partial spec, validation, old fields
  grids       float64 step grids on the discrete schedule (time, log-SNR, Karras σ; fractional t)
  denoiser    the network as x̂_0(x_t, t) at any (fractional) t, for the ODE/SDE solvers
  ancestral   Algorithm 2, full or respaced               (``ancestral``)
  ddim        DDIM, η ≥ 0                                   (``ddim``)
  dpm_solver  DPM-Solver++(2M) and its SDE variant          (``dpmpp_2m``, ``dpmpp_2m_sde``)
  heun        Heun's 2nd-order method on the Karras grid    (``heun``)

A new sampler is one module here defining a `Sampler` subclass and calling `register`, plus its
import in `_BUILTIN` below (docs/extending.md).
"""

from __future__ import annotations

import importlib
from typing import Optional

from diffusion.samplers.base import (
    SAMPLERS,
    Sampler,
    SampleResult,
    SamplerSpec,
    get,
    initial_noise,
    register,
)
from diffusion.samplers.config import (
    REMOVED_FIELDS,
    config_problems,
    grid_spec_from_config,
    migrate_saved_config,
    parse_spec,
    spec_from_config,
)

__all__ = [
    "SamplerSpec",
    "SampleResult",
    "Sampler",
    "SAMPLERS",
    "register",
    "get",
    "initial_noise",
    "draw",
    "tag",
    "describe",
    "nfe",
    "spec_from_config",
    "grid_spec_from_config",
    "config_problems",
    "migrate_saved_config",
    "parse_spec",
    "REMOVED_FIELDS",
]

# The built-in samplers, imported so that the registry is complete whenever this package is.
_BUILTIN = ("ancestral", "ddim", "dpm_solver", "heun")
for _name in _BUILTIN:
    importlib.import_module(f"diffusion.samplers.{_name}")


def draw(
    spec: SamplerSpec,
    schedule,
    denoise_fn,
    shape,
    key,
    param,
    *,
    progressive_every: Optional[int] = None,
) -> SampleResult:
    """Runs the sampler ``spec.method`` (wrap in ``jax.jit``; ``shape`` ``(B, H, W, C)`` static,
    ``schedule`` closed over). ``denoise_fn(x_t [B, H, W, C], t [B]) -> [B, H, W, C or 2C]``;
    ``param`` the `Parameterization`. Returns a `SampleResult` (x_0 in [−1, 1])."""
    return get(spec.method).run(
        spec, schedule, denoise_fn, tuple(shape), key, param, progressive_every=progressive_every
    )


def tag(spec: SamplerSpec, num_timesteps: int) -> str:
    """The sampler's tag for file names and result keys (e.g. ``full1000``, ``respaced50``,
    ``ddim50_eta0``, ``dpmpp_2m20_logsnr``, ``heun10_rho7``)."""
    return get(spec.method).tag(spec, num_timesteps)


def describe(spec: SamplerSpec, num_timesteps: int) -> str:
    """The sampler's one-line description for logs, with its NFE."""
    return get(spec.method).describe(spec, num_timesteps)


def nfe(spec: SamplerSpec, num_timesteps: int) -> int:
    """Network calls per sample."""
    return get(spec.method).nfe(spec, num_timesteps)
