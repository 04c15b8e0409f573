"""The ancestral sampler (paper Algorithm 2): the full T-step chain (``num_steps = 0``) or the
respaced K-step chain (Improved DDPM's ``SpacedDiffusion``). The maths is `diffusion.sampling`."""

from __future__ import annotations

from typing import List

from diffusion import sampling
from diffusion.samplers.base import Sampler, SampleResult, register

__all__ = ["Ancestral"]


class Ancestral(Sampler):
    """x_{t−1} = μθ(x_t, t) + σ_t z (Algorithm 2, Eq. 11 for ε-prediction) over all T steps, or
    over K respaced steps with the respaced β_i (``sampling.respaced_sample``). Tags ``full<T>`` /
    ``respaced<K>`` (unchanged from before the registry, so stored evaluations stay valid)."""

    name = "ancestral"

    def run(self, spec, schedule, denoise_fn, shape, key, param, *, progressive_every=None):
        """See `Sampler.run`; supports ``progressive_every`` (paper Fig. 6)."""
        kw = dict(
            param.model_kwargs,
            clip_denoised=spec.clip_denoised,
            return_progressive_every=progressive_every,
        )
        if spec.num_steps == 0:
            out = sampling.ancestral_sample(schedule, denoise_fn, shape, key, **kw)
        else:
            out = sampling.respaced_sample(
                schedule, denoise_fn, shape, key, num_steps=int(spec.num_steps), **kw
            )
        return SampleResult(*out) if progressive_every else SampleResult(out, None)

    def tag(self, spec, num_timesteps):
        return f"full{num_timesteps}" if spec.num_steps == 0 else f"respaced{spec.num_steps}"

    def describe(self, spec, num_timesteps):
        if spec.num_steps == 0:
            return f"full T={num_timesteps}-step ancestral (NFE {num_timesteps})"
        return f"respaced K={spec.num_steps}-step ancestral (NFE {spec.num_steps})"

    def problems(self, spec, config, where) -> List[str]:
        if spec.num_steps and config.diffusion.var_type == "learned":
            return [
                f"{where['num_steps']}={spec.num_steps}: a respaced ancestral chain cannot use "
                "config.diffusion.var_type='learned' (its log-variance is the one-step "
                f"kernel's); set {where['num_steps']}=0 or {where['method']}='ddim'"
            ]
        return []


register(Ancestral())
