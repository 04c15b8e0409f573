"""DDPM (Ho et al. 2020) in JAX/Flax: pure functional diffusion math, a Linen U-Net, a sharded
train step, Orbax checkpoints and a lax.scan sampler."""

__version__ = "0.1.0"
