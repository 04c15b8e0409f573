"""Samplers chosen by config: a registry of named samplers with one signature and one result type.

``config.sample.method`` names the sampler (``ancestral`` | ``ddim``, or any registered name),
``config.sample.eta`` is DDIM's η; the number of steps depends on the use — the evaluation chain
``config.eval.sample_steps`` (0 = the full T-step chain), the training grid's cheap preview
``config.training.grid_sample_steps`` — and x̂_0 clipping follows ``config.eval.clip_denoised``.
`spec_from_config` collects them into a `SamplerSpec`; `draw` runs the named sampler.

A new sampler is one function registered under a name::

    @register_sampler("my_sampler")
    def my_sampler(schedule, denoise_fn, shape, key, param, spec, progressive_every):
        ...                                   # build x_0 [B, H, W, C] in [-1, 1]
        return SampleResult(x0, None)

after which ``--config.sample.method=my_sampler`` selects it everywhere (training grid,
``--mode sample``, ``--mode evaluate``). The maths lives in `diffusion.sampling`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import jax.numpy as jnp

from diffusion import sampling
from diffusion.parameterization import Parameterization
from diffusion.schedules import Schedule

__all__ = [
    "SamplerSpec",
    "SampleResult",
    "SAMPLERS",
    "register_sampler",
    "draw",
    "spec_from_config",
    "sampler_problems",
    "chain_tag",
]


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to sample: registry ``method``, ``steps`` (0: every one of the T steps; K: K steps of a
    respaced / strided schedule), DDIM ``eta`` and ``clip_denoised`` (clip x̂_0 to [−1, 1])."""

    method: str = "ancestral"
    steps: int = 0
    eta: float = 0.0
    clip_denoised: bool = True


class SampleResult(NamedTuple):
    """A sampler's output: ``x`` ``[B, H, W, C]`` float32 in [−1, 1]; ``progressive``
    ``[n, B, H, W, C]`` x̂_0 predictions along the chain (paper Fig. 6) or None."""

    x: jnp.ndarray
    progressive: Optional[jnp.ndarray] = None


SamplerFn = Callable[..., SampleResult]
SAMPLERS: Dict[str, SamplerFn] = {}


def register_sampler(name: str) -> Callable[[SamplerFn], SamplerFn]:
    """Decorator: registers ``fn(schedule, denoise_fn, shape, key, param, spec,
    progressive_every) -> SampleResult`` under ``name`` (``config.sample.method``)."""

    def deco(fn: SamplerFn) -> SamplerFn:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered")
        SAMPLERS[name] = fn
        return fn

    return deco


def _result(out, progressive_every) -> SampleResult:
    return SampleResult(*out) if progressive_every else SampleResult(out, None)


@register_sampler("ancestral")
def _ancestral(schedule, denoise_fn, shape, key, param, spec, progressive_every):
    """Algorithm 2 over all T steps (``steps = 0``) or on a K-step respaced schedule."""
    kw = dict(
        param.model_kwargs,
        clip_denoised=spec.clip_denoised,
        return_progressive_every=progressive_every,
    )
    if spec.steps == 0:
        return _result(
            sampling.ancestral_sample(schedule, denoise_fn, shape, key, **kw), progressive_every
        )
    return _result(
        sampling.respaced_sample(schedule, denoise_fn, shape, key, num_steps=spec.steps, **kw),
        progressive_every,
    )


@register_sampler("ddim")
def _ddim(schedule, denoise_fn, shape, key, param, spec, progressive_every):
    """DDIM (Song et al. 2021, Eq. 12) with σ_t(η) (Eq. 16) over all T or K strided steps."""
    return _result(
        sampling.ddim_sample(
            schedule,
            denoise_fn,
            shape,
            key,
            **param.model_kwargs,
            clip_denoised=spec.clip_denoised,
            eta=spec.eta,
            num_steps=spec.steps or None,
            return_progressive_every=progressive_every,
        ),
        progressive_every,
    )


def draw(
    spec: SamplerSpec,
    schedule: Schedule,
    denoise_fn,
    shape,
    key,
    param: Parameterization,
    *,
    progressive_every: Optional[int] = None,
) -> SampleResult:
    """Runs the sampler ``spec.method`` (wrap in ``jax.jit``; ``shape`` ``(B, H, W, C)`` static).

    ``denoise_fn(x_t [B, H, W, C], t int32 [B]) -> [B, H, W, C or 2C]``; key split as in
    `diffusion.sampling`. Returns a `SampleResult`."""
    try:
        fn = SAMPLERS[spec.method]
    except KeyError:
        raise ValueError(
            f"unknown sampler {spec.method!r}; registered: {sorted(SAMPLERS)}"
        ) from None
    return fn(schedule, denoise_fn, tuple(shape), key, param, spec, progressive_every)


def spec_from_config(config, *, steps: Optional[int] = None) -> SamplerSpec:
    """The `SamplerSpec` of ``config``: ``config.sample.method`` / ``eta`` (defaults
    ``ancestral`` / 0 for configs saved before ``config.sample`` existed), ``steps`` (default
    ``config.eval.sample_steps``) and ``config.eval.clip_denoised``."""
    s = config.get("sample") or {}
    return SamplerSpec(
        method=s.get("method", "ancestral"),
        steps=int(config.eval.sample_steps if steps is None else steps),
        eta=float(s.get("eta", 0.0)),
        clip_denoised=bool(config.eval.clip_denoised),
    )


def chain_tag(spec: SamplerSpec, num_timesteps: int) -> str:
    """A short name of the chain for file names and results: ``full<T>`` / ``respaced<K>`` (the
    ancestral sampler), ``ddim<K>_eta<η>`` (DDIM; K = T for the full schedule), ``<method><K>``."""
    k = spec.steps or num_timesteps
    if spec.method == "ancestral":
        return f"full{num_timesteps}" if spec.steps == 0 else f"respaced{spec.steps}"
    if spec.method == "ddim":
        return f"ddim{k}_eta{spec.eta:g}"
    return f"{spec.method}{k}"


def sampler_problems(config: Any) -> List[str]:
    """Problems with ``config.sample`` (and the step counts it is used with) as one-line messages
    naming the field; empty when valid."""
    p: List[str] = []
    s = config.get("sample")
    if s is None:
        return p
    method = s.get("method", "ancestral")
    if method not in SAMPLERS:
        p.append(
            f"config.sample.method={method!r} is not a registered sampler; choose one of "
            f"{sorted(SAMPLERS)}"
        )
    eta = s.get("eta", 0.0)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
        p.append(
            f"config.sample.eta={eta!r} is out of range; allowed: a number >= 0 (DDIM's η: "
            "0 deterministic, 1 the ancestral step's variance)"
        )
    return p
