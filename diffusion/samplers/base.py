"""The sampler spec, the result type, the `Sampler` interface and the registry.

A sampler is one object (a `Sampler` subclass instance) registered under its ``name``; it owns
its run (one ``lax.scan`` with whatever carry it needs), its tag for file names and result keys,
its one-line description for logs, its network-call count and its config problems.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

__all__ = ["SamplerSpec", "SampleResult", "Sampler", "SAMPLERS", "register", "get", "initial_noise"]


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """How to sample (``config.sample``): registry ``method``; ``num_steps`` (0: the full T-step
    chain, K: K steps of the method's grid); DDIM's ``eta``; ``clip_denoised`` (clip x̂_0 to
    [−1, 1]); ``options``: the method's own options (``config.sample.<method>``) as sorted
    ``(name, value)`` pairs, so the spec stays hashable (a static ``jax.jit`` argument)."""

    method: str = "ancestral"
    num_steps: int = 0
    eta: float = 0.0
    clip_denoised: bool = True
    options: Tuple[Tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        """The value of option ``name`` (``default`` when unset)."""
        return dict(self.options).get(name, default)


class SampleResult(NamedTuple):
    """A sampler's output: ``x`` ``[B, H, W, C]`` float32 in [−1, 1]; ``progressive``
    ``[n, B, H, W, C]`` x̂_0 predictions along the chain (paper Fig. 6) or None."""

    x: jnp.ndarray
    progressive: Optional[jnp.ndarray] = None


class Sampler(abc.ABC):
    """One sampling method. Subclasses set ``name`` (``config.sample.method``), ``options``
    (defaults of ``config.sample.<name>``; empty when it has none), ``uses_eta``, and implement
    `run`, `tag` and `describe`; `nfe` defaults to one network call per step."""

    name: str = ""
    options: Mapping[str, Any] = {}
    uses_eta: bool = False

    @abc.abstractmethod
    def run(
        self,
        spec: SamplerSpec,
        schedule,
        denoise_fn,
        shape: Tuple[int, ...],
        key,
        param,
        *,
        progressive_every: Optional[int] = None,
    ) -> SampleResult:
        """Draws ``shape`` = ``(B, H, W, C)`` samples. ``denoise_fn(x_t [B, H, W, C], t [B])`` is
        the network (t: code indices of the original schedule); ``param`` the
        `Parameterization`. Keys: ``k_init, k_chain = split(key)``, x_T from ``k_init``."""

    @abc.abstractmethod
    def tag(self, spec: SamplerSpec, num_timesteps: int) -> str:
        """A short name for file names and result keys (no spaces, unique per sample set)."""

    @abc.abstractmethod
    def describe(self, spec: SamplerSpec, num_timesteps: int) -> str:
        """A one-line human-readable description for logs, with the network-call count."""

    def opt(self, spec: SamplerSpec, name: str) -> Any:
        """Option ``name`` of ``spec``, else this sampler's default (``options[name]``)."""
        return spec.option(name, self.options[name])

    def steps(self, spec: SamplerSpec, num_timesteps: int) -> int:
        """The number of steps K (``spec.num_steps``, 0 meaning T)."""
        return int(spec.num_steps) or int(num_timesteps)

    def nfe(self, spec: SamplerSpec, num_timesteps: int) -> int:
        """Network calls per sample (default: one per step)."""
        return self.steps(spec, num_timesteps)

    def steps_for_nfe(self, nfe: int, num_timesteps: int) -> int:
        """The ``num_steps`` whose `nfe` is the largest not above ``nfe`` (at least 1)."""
        return max(1, int(nfe))

    def problems(self, spec: SamplerSpec, config: Any, where: Mapping[str, str]) -> List[str]:
        """Problems specific to this method as one-line messages; ``where[field]`` is the config
        path that set each spec field (e.g. ``'config.sample.num_steps'``)."""
        return []


SAMPLERS: Dict[str, Sampler] = {}


def register(sampler: Sampler) -> Sampler:
    """Adds ``sampler`` to the registry under ``sampler.name``; returns it."""
    if not sampler.name:
        raise ValueError(f"{type(sampler).__name__} has no name")
    if sampler.name in SAMPLERS:
        raise ValueError(f"a sampler named {sampler.name!r} is already registered")
    SAMPLERS[sampler.name] = sampler
    return sampler


def get(method: str) -> Sampler:
    """The registered sampler ``method``; ValueError listing the registered names otherwise."""
    try:
        return SAMPLERS[method]
    except KeyError:
        raise ValueError(f"unknown sampler {method!r}; registered: {sorted(SAMPLERS)}") from None


def initial_noise(key, shape):
    """``(x_T [B, H, W, C] ~ N(0, I) float32, k_chain)``: ``k_init, k_chain = split(key)`` and
    x_T from ``k_init`` — the split every built-in sampler uses."""
    k_init, k_chain = jax.random.split(key)
    return jax.random.normal(k_init, tuple(shape), dtype=jnp.float32), k_chain
