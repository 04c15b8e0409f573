"""The peer: Hugging Face diffusers' ``UNet2DModel`` configured as the paper's CIFAR10 U-Net, with a
plain PyTorch DDPM train step and diffusers' ``DDPMScheduler`` sampling loop.

Architecture match (checked: exactly 35,746,307 parameters, the same as ours): 4 levels of widths
(128, 256, 256, 256), 2 ResBlocks per level (3 on the way up), single-head attention at 16×16
(down level 1, up level 2) and in the middle, GroupNorm(32, eps 1e-6), swish, sinusoidal timestep
embedding with sin first and exponent ``i/(half−1)`` (``flip_sin_to_cos=False, freq_shift=1``),
4·ch time MLP, conv down/upsampling, dropout 0.1, no scale-shift norm.

Train step (the same algorithm as ``diffusion.training.step.make_train_step``): t ~ U{0..999},
ε ~ N(0, I), x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε (linear betas 1e-4..0.02), ε-MSE, backward,
``clip_grad_norm_(1.0)``, Adam(lr 2e-4) — the fused CPU kernel where available, else foreach —
and an EMA (decay 0.9999) of a copy of the parameters with ``torch._foreach_mul_/add_``.

Importing this module imports torch and diffusers; callers catch ImportError to skip the peer.
"""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

EXPECTED_PARAMS = 35_746_307

UNET_KWARGS = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    add_attention=True,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
    flip_sin_to_cos=False,
    freq_shift=1,
    act_fn="silu",
    attention_head_dim=None,  # None: one head as wide as the block (256 here)
    resnet_time_scale_shift="default",
    downsample_type="conv",
    upsample_type="conv",
    downsample_padding=1,
    mid_block_scale_factor=1,
    dropout=0.1,
)


def set_threads(n: int) -> None:
    """Intra-op threads of torch (call with the same count JAX uses)."""
    torch.set_num_threads(int(n))


def build_unet(seed: int = 0) -> UNet2DModel:
    """The CIFAR10-shaped ``UNet2DModel``; asserts exactly ``EXPECTED_PARAMS`` parameters."""
    torch.manual_seed(seed)
    model = UNet2DModel(**UNET_KWARGS)
    n = count_params(model)
    assert n == EXPECTED_PARAMS, (
        f"diffusers UNet2DModel has {n:,} parameters, expected {EXPECTED_PARAMS:,}"
    )
    return model


def count_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _linear_alphas_cumprod(T: int = 1000, start: float = 1e-4, end: float = 0.02):
    betas = torch.linspace(start, end, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def _adam(params, lr):
    try:
        return torch.optim.Adam(params, lr=lr, eps=1e-8, fused=True), "fused"
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, eps=1e-8, foreach=True), "foreach"


class PeerTrainer:
    """One DDPM training step of the diffusers U-Net in PyTorch (see the module docstring)."""

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        lr: float = 2e-4,
        ema_decay: float = 0.9999,
        grad_clip: float = 1.0,
        num_timesteps: int = 1000,
    ):
        self.model = build_unet(seed)
        self.model.train()
        self.n_params = count_params(self.model)
        self.params = [p for p in self.model.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        self.opt, self.adam_impl = _adam(self.params, lr)
        self.decay, self.clip, self.T = ema_decay, grad_clip, num_timesteps
        ac = _linear_alphas_cumprod(num_timesteps)
        self.sqrt_ac = ac.sqrt().float()
        self.sqrt_1mac = (1.0 - ac).sqrt().float()
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.rand((batch_size, 3, 32, 32), generator=g) * 2 - 1
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.batch_size = batch_size
        self.last_loss = float("nan")

    def step(self) -> float:
        """One full step; returns the loss."""
        B = self.x0.shape[0]
        t = torch.randint(0, self.T, (B,), generator=self.gen)
        noise = torch.randn(self.x0.shape, generator=self.gen)
        x_t = (
            self.sqrt_ac[t].view(B, 1, 1, 1) * self.x0 + self.sqrt_1mac[t].view(B, 1, 1, 1) * noise
        )
        out = self.model(x_t, t).sample
        loss = F.mse_loss(out, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_mul_(self.ema, self.decay)
            torch._foreach_add_(self.ema, [p.detach() for p in self.params], alpha=1.0 - self.decay)
        return float(loss.detach())

    def run(self) -> float:
        """One timed step (seconds). torch on CPU is synchronous, so wall time is the cost."""
        t0 = time.perf_counter()
        self.last_loss = self.step()
        return time.perf_counter() - t0


class PeerSampler:
    """diffusers' DDPM ancestral sampling loop (``DDPMScheduler``, fixed_large variance, x̂0
    clipped) over ``steps`` steps with the U-Net in eval mode under ``torch.inference_mode``,
    and the bare forward at the same batch for the peer's own overhead."""

    def __init__(self, batch_size: int, steps: int, seed: int = 0):
        self.model = build_unet(seed).eval()
        self.sched = DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=1e-4,
            beta_end=0.02,
            beta_schedule="linear",
            variance_type="fixed_large",
            clip_sample=True,
            prediction_type="epsilon",
        )
        self.sched.set_timesteps(steps)
        self.steps = len(self.sched.timesteps)
        self.shape = (batch_size, 3, 32, 32)
        self.gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(self.shape, generator=self.gen)
        self.t = torch.full((batch_size,), 500, dtype=torch.long)
        self.run_forward()  # warm-up
        self.run_chain()

    @torch.inference_mode()
    def _chain(self):
        x = torch.randn(self.shape, generator=self.gen)
        for t in self.sched.timesteps:
            eps = self.model(x, t).sample
            x = self.sched.step(eps, t, x, generator=self.gen).prev_sample
        return x

    def run_chain(self) -> float:
        t0 = time.perf_counter()
        self._chain()
        return time.perf_counter() - t0

    def run_forward(self) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            self.model(self.x, self.t)
        return time.perf_counter() - t0


def memory_child(batch_size: int, steps: int, threads: Optional[int] = None) -> dict:
    """Builds the peer in this (fresh) process, runs ``steps`` train steps, reports RSS (MiB) as
    `benchmarks.ours_jax.memory_child` does."""
    from benchmarks.common import malloc_trim, maxrss_mb, peak_rss_mb, reset_peak_rss, rss_now_mb

    if threads:
        set_threads(threads)
    out = {"baseline_rss_mb": rss_now_mb(), "baseline_peak_rss_mb": peak_rss_mb()}
    trainer = PeerTrainer(batch_size)
    out["after_build_peak_rss_mb"] = peak_rss_mb()
    trainer.run()
    out["peak_rss_mb"] = peak_rss_mb()
    step_peak = reset_peak_rss()
    for _ in range(max(steps - 1, 1)):
        trainer.run()
    out["peak_rss_mb"] = max(out["peak_rss_mb"], peak_rss_mb())
    out.update(
        step_phase_peak_rss_mb=peak_rss_mb() if step_peak else None,
        ru_maxrss_mb=maxrss_mb(),
        final_rss_mb=rss_now_mb(),
        n_params=trainer.n_params,
        loss=trainer.last_loss,
        steps=max(steps, 2),
        batch=batch_size,
    )
    if malloc_trim():  # diagnostic: how much of the final RSS was freed-but-retained heap
        out["final_rss_after_malloc_trim_mb"] = rss_now_mb()
    return out
