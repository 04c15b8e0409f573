"""DDIM (Song, Meng & Ermon 2021) on the full or a strided schedule; maths in `diffusion.sampling`."""

from __future__ import annotations

from diffusion import sampling
from diffusion.samplers.base import Sampler, SampleResult, register

__all__ = ["DDIM"]


class DDIM(Sampler):
    """x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1−ᾱ_{t−1}−σ_t²) ε̂ + σ_t z (Eq. 12), σ_t = η √β̃_t (Eq. 16),
    over all T or K strided steps (`sampling.space_timesteps`, both ends kept). η = 0 is the
    first-order (Euler) solver of the probability-flow ODE in log-SNR (Lu et al. 2022, Sec. 4.1).
    Tag ``ddim<K>_eta<η>`` (K = T for the full schedule; unchanged from before the registry)."""

    name = "ddim"
    uses_eta = True

    def run(self, spec, schedule, denoise_fn, shape, key, param, *, progressive_every=None):
        """See `Sampler.run`; supports ``progressive_every``."""
        out = sampling.ddim_sample(
            schedule,
            denoise_fn,
            shape,
            key,
            **param.model_kwargs,
            clip_denoised=spec.clip_denoised,
            eta=float(spec.eta),
            num_steps=int(spec.num_steps) or None,
            return_progressive_every=progressive_every,
        )
        return SampleResult(*out) if progressive_every else SampleResult(out, None)

    def tag(self, spec, num_timesteps):
        return f"ddim{self.steps(spec, num_timesteps)}_eta{spec.eta:g}"

    def describe(self, spec, num_timesteps):
        k = self.steps(spec, num_timesteps)
        return f"DDIM K={k}-step, eta={spec.eta:g} (NFE {k})"


register(DDIM())
