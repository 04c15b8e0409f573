"""Sampling from a trained DDPM (Ho et al. 2020): the ancestral sampler (Algorithm 2) as one
`jax.lax.scan`, progressive x̂_0 predictions (Fig. 6), respaced sampling (Improved DDPM's
``SpacedDiffusion``), DDIM (Song et al. 2021), and interpolation in x_t (Sec. 4.4). The batched,
mesh-sharded driver for the tens of thousands of samples FID needs is
`diffusion.evaluation.generator.sample_in_batches`.

Conventions. ``denoise_fn(x_t, t) -> model output``: ``x_t`` is ``[B, ...]`` (usually
``[B, H, W, C]``) float32, ``t`` is int32 ``[B]`` holding code indices 0..T−1 of the ORIGINAL
schedule (paper time t+1); the output is ``[B, ..., C]`` for fixed variances and ``[B, ..., 2C]``
for learned ones (see `diffusion.gaussian.p_mean_variance`). Samples live in [−1, 1].

Randomness is stateless. For ``key``: ``k_init, k_chain = jax.random.split(key)``; x_T is drawn
from ``k_init``; the noise of the reverse step at chain index ``t`` comes from
``jax.random.fold_in(k_chain, t)``. `decode` runs the chain from a given x_t with ``k_chain``
directly, so ``ancestral_sample(key) == decode(x_T, T−1, k_chain)``.

Nothing here is jitted on its own: wrap the samplers in ``jax.jit`` with ``shape`` and the keyword
options static (e.g. ``jax.jit(functools.partial(ancestral_sample, schedule, fn, shape,
mean_type='eps', var_type='fixedlarge'))``). Each sampler is a single ``lax.scan`` over the
steps, so the compiled program holds one copy of the network whatever T is.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import gaussian
from diffusion.schedules import Schedule

__all__ = [
    "to_uint8",
    "space_timesteps",
    "respace_schedule",
    "decode",
    "ancestral_sample",
    "respaced_sample",
    "ddim_mean_std",
    "ddim_sample",
    "interpolate",
    "progressive_timesteps",
]

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def to_uint8(x):
    """[−1, 1] floats -> uint8 [0, 255]: ``round(clip((x + 1) · 127.5, 0, 255))``.

    The inverse of the data map ``x = k/127.5 − 1`` (8-bit values round-trip exactly). Rounding is
    half-to-even (``jnp.round``/``np.round``, like ``tf.round``). Works on NumPy and JAX arrays of
    any shape and returns the same kind. Note: the released code's image summaries truncate
    (``np.clip(...).astype('uint8')``), which biases pixels down by 0.5 on average; we round.
    """
    xp = np if isinstance(x, np.ndarray) or np.isscalar(x) else jnp
    y = xp.round(xp.clip((xp.asarray(x, dtype=xp.float32) + 1.0) * 127.5, 0.0, 255.0))
    return y.astype(xp.uint8)


def progressive_timesteps(t_start: int, every: int) -> np.ndarray:
    """The chain indices at which ``return_progressive_every=every`` records x̂_0, in the order of
    the returned array (chronological: descending t, last entry t = 0): ``[(n−1)·k, ..., k, 0]``
    with ``n = t_start // k + 1``."""
    if not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"return_progressive_every must be a positive int, got {every!r}")
    n = int(t_start) // int(every) + 1
    return np.arange(n - 1, -1, -1, dtype=np.int64) * int(every)


def _check_shape(shape) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a tuple of ints [B, ...], got {shape!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be [B, ...] with positive sizes, got {shape}")
    return shape


# ---------------------------------------------------------------------------------------------
# Respacing (Improved DDPM, Nichol & Dhariwal 2021, Sec. 4 / `respace.py`)
# ---------------------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, section_counts: Union[int, str, Sequence[int]]) -> list:
    """Which of the T original steps to keep, as Improved DDPM's ``space_timesteps``.

    ``section_counts``:
      * an int K: K steps evenly spaced over [0, T−1], both ends included (rounded strides);
      * ``"ddimK"``: the DDIM paper's fixed stride, ``range(0, T, stride)`` with the stride that
        gives exactly K steps (ValueError if none does);
      * ``"10,15,20"`` or a sequence: split [0, T) into equal sections and take that many evenly
        spaced steps from each.
    Returns a sorted list of distinct ints in [0, T).
    """
    T = int(num_timesteps)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, T + 1):
                if len(range(0, T, stride)) == desired:
                    return list(range(0, T, stride))
            raise ValueError(
                f"cannot create exactly {desired} steps with an integer stride over T={T}"
            )
        section_counts = [int(s) for s in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        section_counts = [int(section_counts)]
    section_counts = [int(c) for c in section_counts]
    if not section_counts or min(section_counts) < 1:
        raise ValueError(f"section counts must be positive, got {section_counts}")
    size_per, extra = divmod(T, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def respace_schedule(schedule_or_betas, use_timesteps) -> Tuple[Schedule, jnp.ndarray]:
    """A K-step schedule through the kept steps k_0 < ... < k_{K−1} of an original one.

    Improved DDPM's ``SpacedDiffusion``: ᾱ is kept at the kept steps and the betas recomputed as
    β_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}} (ᾱ_{k_{−1}} = 1), so the respaced forward process has exactly the
    marginals q(x_{k_i} | x_0) the network was trained on.

    Args:
      schedule_or_betas: original betas ``[T]`` (preferably the float64 output of
        `get_beta_schedule`; then ᾱ is formed in float64) or a `Schedule` (its float32 ᾱ buffer
        is used, so ᾱ at the kept steps is reproduced bit-for-bit; if every step is kept the
        schedule is returned unchanged).
      use_timesteps: iterable of original indices to keep (e.g. from `space_timesteps`).

    Returns:
      ``(schedule [K], timestep_map int32 [K])``; respaced step i stands for original step
      ``timestep_map[i]``, the index to feed to the network.
    """
    if isinstance(schedule_or_betas, Schedule):
        T = schedule_or_betas.num_timesteps
        if isinstance(schedule_or_betas.alphas_cumprod, jax.core.Tracer):
            raise ValueError(
                "respace_schedule needs concrete schedule values (the new betas are computed in "
                "float64 NumPy), but got a traced Schedule: close over the schedule "
                "(functools.partial(sampler, schedule, ...)) instead of passing it as a jit "
                "argument, or respace outside jit."
            )
        alphas_cumprod = np.asarray(schedule_or_betas.alphas_cumprod, dtype=np.float64)
    else:
        betas = np.asarray(schedule_or_betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError(f"betas must be 1-D [T], got shape {betas.shape}")
        T = betas.shape[0]
        alphas_cumprod = np.cumprod(1.0 - betas)
    keep = sorted({int(k) for k in use_timesteps})
    if not keep or keep[0] < 0 or keep[-1] >= T:
        raise ValueError(
            f"use_timesteps must be a non-empty subset of range({T}), got {keep[:5]}...{keep[-5:]}"
        )
    timestep_map = jnp.asarray(keep, dtype=jnp.int32)
    if isinstance(schedule_or_betas, Schedule) and len(keep) == T:
        return schedule_or_betas, timestep_map
    new_betas, last = [], 1.0
    for k in keep:
        new_betas.append(1.0 - alphas_cumprod[k] / last)
        last = alphas_cumprod[k]
    return Schedule.from_betas(np.asarray(new_betas, dtype=np.float64)), timestep_map


def _respaced(schedule: Schedule, num_steps) -> Tuple[Schedule, jnp.ndarray]:
    T = schedule.num_timesteps
    if num_steps is None:
        return schedule, jnp.arange(T, dtype=jnp.int32)
    return respace_schedule(schedule, space_timesteps(T, num_steps))


def _respaced_model_fn(
    orig_schedule: Schedule,
    denoise_fn: DenoiseFn,
    timestep_map,
    *,
    mean_type: str,
    var_type: str,
    convert_xprev: bool,
):
    """A model_fn(x, i) for a chain on a respaced schedule: calls ``denoise_fn`` with the
    original index ``timestep_map[i]``. An ``xprev`` network predicts the ORIGINAL one-step
    posterior mean, so its output is turned into x̂_0 with the original schedule (the returned
    mean_type becomes 'xstart')."""

    def model_fn(x, i_b):
        t_orig = jnp.take(timestep_map, i_b)
        out = denoise_fn(x, t_orig)
        if not (convert_xprev and mean_type == "xprev"):
            return out
        if var_type in ("learned", "learned_range"):
            mean_out, var_out = jnp.split(out, 2, axis=-1)
        else:
            mean_out, var_out = out, None
        x0 = gaussian.predict_xstart_from_xprev(orig_schedule, x, t_orig, mean_out)
        return x0 if var_out is None else jnp.concatenate([x0, var_out], axis=-1)

    eff_mean_type = "xstart" if (convert_xprev and mean_type == "xprev") else mean_type
    return model_fn, eff_mean_type


# ---------------------------------------------------------------------------------------------
# The reverse chain: one lax.scan
# ---------------------------------------------------------------------------------------------


def _normal_like(key, t, shape, noise_shape):
    """Standard normal noise for chain index t, drawn with ``noise_shape`` and tiled along the
    batch to ``shape`` (interpolation shares one noise draw across its λ's)."""
    z = jax.random.normal(jax.random.fold_in(key, t), noise_shape, dtype=jnp.float32)
    if noise_shape != shape:
        z = jnp.tile(z, (shape[0] // noise_shape[0],) + (1,) * (len(shape) - 1))
    return z


def _run_chain(step_fn, x_init, t_start: int, key, *, progressive_every, noise_shape=None):
    """Scans ``step_fn(x, t, z) -> (x_prev, pred_xstart)`` over t = t_start..0.

    Returns x_final, or (x_final, progressive [n, B, ...]) with x̂_0 at `progressive_timesteps`."""
    shape = tuple(x_init.shape)
    noise_shape = shape if noise_shape is None else tuple(noise_shape)
    ts = jnp.arange(t_start, -1, -1, dtype=jnp.int32)

    if progressive_every is None:

        def body(x, t):
            x_prev, _ = step_fn(x, t, _normal_like(key, t, shape, noise_shape))
            return x_prev, None

        x_final, _ = jax.lax.scan(body, x_init, ts)
        return x_final

    k = int(progressive_every)
    n = len(progressive_timesteps(t_start, k))
    buf0 = jnp.zeros((n,) + shape, x_init.dtype)

    def body_prog(carry, t):
        x, buf = carry
        x_prev, x0 = step_fn(x, t, _normal_like(key, t, shape, noise_shape))
        # Slot of t (chronological order); steps that are not multiples of k rewrite the slot's old
        # content, which is overwritten later by the multiple of k below them — an in-place update.
        slot = n - 1 - t // k
        value = jnp.where(t % k == 0, x0, jax.lax.dynamic_index_in_dim(buf, slot, 0, False))
        buf = jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), slot, 0)
        return (x_prev, buf), None

    (x_final, buf), _ = jax.lax.scan(body_prog, (x_init, buf0), ts)
    return x_final, buf


def _ancestral_step(schedule, model_fn, *, mean_type, var_type, clip_denoised):
    def step(x, t, z):
        t_b = jnp.full((x.shape[0],), t, dtype=jnp.int32)
        p = gaussian.p_mean_variance(
            schedule,
            model_fn(x, t_b),
            x,
            t_b,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )
        # No noise at t = 0 (Algorithm 2, line 4: z = 0 if t = 1).
        x_prev = jnp.where(t > 0, p.mean + jnp.exp(0.5 * p.log_variance) * z, p.mean)
        return x_prev, p.pred_xstart

    return step


def _identity_model_fn(denoise_fn):
    return lambda x, t_b: denoise_fn(x, t_b)


def decode(
    schedule: Schedule,
    denoise_fn: DenoiseFn,
    x_t,
    t: int,
    key,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    return_progressive_every: Optional[int] = None,
):
    """Runs the reverse chain pθ(x_{s−1} | x_s) from a given ``x_t`` at code index ``t`` down to x_0
    (Algorithm 2, lines 3–5, started at paper step t+1 instead of T).

    Each step: x_{s−1} = μθ(x_s, s) + exp(½ log σ_s²) z with z = ``normal(fold_in(key, s))`` and no
    noise at s = 0. ``x_t``: ``[B, ...]``; ``t``: Python int (static) in [0, T); returns
    ``[B, ...]`` or ``(x_0, progressive [n, B, ...])`` (see `ancestral_sample`).
    """
    gaussian.check_types(mean_type, var_type)
    t = int(t)
    if not 0 <= t < schedule.num_timesteps:
        raise ValueError(f"t must be in [0, {schedule.num_timesteps}), got {t}")
    step = _ancestral_step(
        schedule,
        _identity_model_fn(denoise_fn),
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    return _run_chain(
        step, jnp.asarray(x_t, jnp.float32), t, key, progressive_every=return_progressive_every
    )


def ancestral_sample(
    schedule: Schedule,
    denoise_fn: DenoiseFn,
    shape,
    key,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    return_progressive_every: Optional[int] = None,
):
    """The ancestral sampler, paper Algorithm 2, as one ``lax.scan`` over t = T−1..0.

    x_T ~ N(0, I); for t = T−1..0: x_{t−1} = μθ(x_t, t) + σ_t z, z ~ N(0, I) for t > 0 and z = 0 at
    t = 0, where μθ, σ_t come from `gaussian.p_mean_variance` (for ``eps`` this is Eq. 11:
    μθ = (x_t − β_t/√(1−ᾱ_t) εθ)/√α_t; with ``clip_denoised`` x̂_0 is clipped to [−1, 1] first, as
    the released code does).

    Args:
      schedule: the `Schedule` the network was trained with (T steps).
      denoise_fn: ``(x_t [B, ...], t int32 [B]) -> [B, ..., C or 2C]``.
      shape: ``(B, H, W, C)`` (any ``[B, ...]``), static.
      key: PRNG key (see the module docstring for how it is split).
      mean_type, var_type: as in `gaussian.p_mean_variance`.
      clip_denoised: clip x̂_0 to [−1, 1] before forming the mean.
      return_progressive_every: if k, also return the x̂_0 predictions at t = (n−1)k, ..., k, 0
        (`progressive_timesteps`), the paper's Fig. 6, kept in an ``[n, B, ...]`` scan carry.

    Returns:
      x_0 ``[B, ...]`` float32, or ``(x_0, progressive [n, B, ...])``; ``progressive[-1]`` is the
      final x̂_0 (equal to x_0 when the last step adds no noise, i.e. always).
    """
    shape = _check_shape(shape)
    gaussian.check_types(mean_type, var_type)
    k_init, k_chain = jax.random.split(key)
    x_T = jax.random.normal(k_init, shape, dtype=jnp.float32)
    return decode(
        schedule,
        denoise_fn,
        x_T,
        schedule.num_timesteps - 1,
        k_chain,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
        return_progressive_every=return_progressive_every,
    )


def respaced_sample(
    schedule: Schedule,
    denoise_fn: DenoiseFn,
    shape,
    key,
    *,
    num_steps,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    return_progressive_every: Optional[int] = None,
):
    """Ancestral sampling (Algorithm 2) on a respaced K-step schedule (Improved DDPM, Sec. 4).

    The chain runs over the kept steps k_{K−1} > ... > k_0 of ``schedule`` with the respaced betas
    of `respace_schedule`, posterior q(x_{k_{i−1}} | x_{k_i}, x_0) and variance β̃_i
    (``fixedsmall``) or β_i (``fixedlarge``) of the respaced process; ``denoise_fn`` is called with the ORIGINAL indices
    k_i. ``learned_range`` interpolates the respaced log β_i and log β̃_i (Improved DDPM); an
    ``xprev`` output is read as the original one-step posterior mean and converted to x̂_0 with the
    original schedule. ``learned`` (raw log σ² of the one-step kernel) has no meaning on a respaced
    chain and raises ValueError (use DDIM, which ignores the variance, or ``learned_range``).

    Args:
      num_steps: K (int: evenly spaced, both ends kept), ``"ddimK"``, or section counts
        ``"10,15,20"`` — see `space_timesteps`.
      Others as in `ancestral_sample`; ``return_progressive_every`` counts respaced steps.

    Returns:
      x_0 ``[B, ...]`` (or with the progressive ``[n, B, ...]``).
    """
    shape = _check_shape(shape)
    gaussian.check_types(mean_type, var_type)
    if var_type == "learned":
        raise ValueError(
            "respaced_sample with var_type='learned': the network outputs log σ² of the original "
            "one-step kernel, which does not transfer to the respaced steps. Use ddim_sample "
            "(ignores the variance), var_type='fixedsmall'/'fixedlarge' or 'learned_range'."
        )
    new_sched, tmap = _respaced(schedule, num_steps)
    model_fn, eff_mean = _respaced_model_fn(
        schedule,
        denoise_fn,
        tmap,
        mean_type=mean_type,
        var_type=var_type,
        convert_xprev=new_sched is not schedule,
    )
    step = _ancestral_step(
        new_sched, model_fn, mean_type=eff_mean, var_type=var_type, clip_denoised=clip_denoised
    )
    k_init, k_chain = jax.random.split(key)
    x_T = jax.random.normal(k_init, shape, dtype=jnp.float32)
    return _run_chain(
        step, x_T, new_sched.num_timesteps - 1, k_chain, progressive_every=return_progressive_every
    )


# ---------------------------------------------------------------------------------------------
# DDIM (Song, Meng & Ermon 2021)
# ---------------------------------------------------------------------------------------------


def ddim_mean_std(
    schedule: Schedule,
    model_output,
    x_t,
    t,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    eta: float = 0.0,
):
    """One DDIM step's Gaussian, Song et al. 2021 Eq. 12 with σ_t(η) of Eq. 16:

      x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z,
      σ_t = η √((1−ᾱ_{t−1})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1}) = η √β̃_t,

    with x̂_0 from `gaussian.p_mean_variance` (clipped if asked) and ε̂ = (x_t − √ᾱ_t x̂_0)/√(1−ᾱ_t)
    recomputed from it (as Improved DDPM does). "t−1" is the previous step of ``schedule``, so pass
    a respaced schedule for strided sampling. η = 1 gives σ_t² = β̃_t and the mean μ̃(x̂_0, x_t),
    i.e. the ancestral step with ``fixedsmall``. The variance half of a learned-variance output is
    ignored.

    ``model_output`` ``[B, ..., C or 2C]``, ``x_t`` ``[B, ...]``, ``t`` int ``[B]``. Returns
    ``(mean [B, ...], std [B, 1, ..., 1], pred_xstart [B, ...])``.
    """
    p = gaussian.p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    x0 = p.pred_xstart
    eps = gaussian.predict_eps_from_xstart(schedule, x_t, t, x0)
    ab_prev = gaussian.extract(schedule.alphas_cumprod_prev, t, x_t.shape)
    post_var = gaussian.extract(schedule.posterior_variance, t, x_t.shape)
    # 1 − ᾱ_{t−1} = β̃_t (1−ᾱ_t)/β_t from float64-built buffers: no float32 cancellation near t = 0.
    one_minus_ab_prev = (
        post_var
        * jnp.square(gaussian.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.shape))
        / gaussian.extract(schedule.betas, t, x_t.shape)
    )
    # σ_t² = η² (1−ᾱ_{t−1})/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_{t−1}) = η² β̃_t, since 1 − ᾱ_t/ᾱ_{t−1} = β_t; the
    # float64-built β̃ buffer avoids float32 cancellation in 1 − ᾱ_t/ᾱ_{t−1} when β_t is small.
    sigma = eta * jnp.sqrt(post_var)
    mean = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(one_minus_ab_prev - sigma**2, 0.0)) * eps
    return mean, sigma, x0


def ddim_sample(
    schedule: Schedule,
    denoise_fn: DenoiseFn,
    shape,
    key,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    eta: float = 0.0,
    num_steps=None,
    return_progressive_every: Optional[int] = None,
):
    """DDIM sampling (Song et al. 2021, Eq. 12) as one ``lax.scan``; see `ddim_mean_std`.

    η = 0 is deterministic given x_T; η = 1 on the full schedule has the same per-step distribution
    as `ancestral_sample` with ``fixedsmall`` (and, with the same key, the same samples up to float
    rounding: keys are split the same way). ``num_steps`` (None = all T; else as in
    `space_timesteps`, e.g. 50 or ``"ddim50"``) runs on the respaced schedule with ᾱ_{t−1} the ᾱ of
    the previous kept step; ``denoise_fn`` always receives original indices. Returns x_0
    ``[B, ...]`` (or with the progressive ``[n, B, ...]``).
    """
    shape = _check_shape(shape)
    gaussian.check_types(mean_type, var_type)
    new_sched, tmap = _respaced(schedule, num_steps)
    model_fn, eff_mean = _respaced_model_fn(
        schedule,
        denoise_fn,
        tmap,
        mean_type=mean_type,
        var_type=var_type,
        convert_xprev=new_sched is not schedule,
    )

    def step(x, t, z):
        t_b = jnp.full((x.shape[0],), t, dtype=jnp.int32)
        mean, std, x0 = ddim_mean_std(
            new_sched,
            model_fn(x, t_b),
            x,
            t_b,
            mean_type=eff_mean,
            var_type=var_type,
            clip_denoised=clip_denoised,
            eta=eta,
        )
        return jnp.where(t > 0, mean + std * z, mean), x0

    k_init, k_chain = jax.random.split(key)
    x_T = jax.random.normal(k_init, shape, dtype=jnp.float32)
    return _run_chain(
        step, x_T, new_sched.num_timesteps - 1, k_chain, progressive_every=return_progressive_every
    )


# ---------------------------------------------------------------------------------------------
# Interpolation (paper Sec. 4.4, Fig. 8)
# ---------------------------------------------------------------------------------------------


def interpolate(
    schedule: Schedule,
    denoise_fn: DenoiseFn,
    x0_a,
    x0_b,
    lambdas,
    t: int,
    key,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = True,
    shared_noise: bool = False,
):
    """Interpolates two images in the latent x_t and decodes (paper Sec. 4.4).

    Each source is encoded by its own draw from q(x_t|x_0) (Eq. 4), as the paper does and the
    released ``diffusion_utils.interpolate`` does: x_t^a = √ᾱ_t x0_a + √(1−ᾱ_t) ε_a, x_t^b likewise
    with an independent ε_b (``shared_noise=True`` uses one ε for both instead). For each λ,
    x̄_t = (1−λ) x_t^a + λ x_t^b is decoded by the reverse chain from code index ``t`` (`decode`),
    with the reverse-step noise shared across all λ so the rows change smoothly.
    Keys: ``k_enc, k_dec = jax.random.split(key)``; ``k_a, k_b = jax.random.split(k_enc)``,
    ε_a = ``normal(k_a, shape)``, ε_b = ``normal(k_b, shape)`` (shared: ε = ``normal(k_enc, shape)``);
    `decode` uses ``k_dec``. So row λ=0 equals ``decode(q_sample(x0_a, t, ε_a), t, k_dec)``.

    Args:
      x0_a, x0_b: ``[B, ...]`` images in [−1, 1].
      lambdas: ``[L]`` mixing weights (0 = a, 1 = b).
      t: Python int in [0, T): how far to noise (the paper uses 500 of 1000 on CelebA-HQ).
      shared_noise: encode both sources with the same ε (not the paper's choice).
    Returns:
      ``[L, B, ...]`` decoded images.
    """
    gaussian.check_types(mean_type, var_type)
    x0_a = jnp.asarray(x0_a, jnp.float32)
    x0_b = jnp.asarray(x0_b, jnp.float32)
    if x0_a.shape != x0_b.shape:
        raise ValueError(f"x0_a {x0_a.shape} and x0_b {x0_b.shape} must have the same shape")
    t = int(t)
    if not 0 <= t < schedule.num_timesteps:
        raise ValueError(f"t must be in [0, {schedule.num_timesteps}), got {t}")
    lambdas = jnp.asarray(lambdas, jnp.float32).reshape(-1)
    L, B = lambdas.shape[0], x0_a.shape[0]
    k_enc, k_dec = jax.random.split(key)
    if shared_noise:
        eps_a = eps_b = jax.random.normal(k_enc, x0_a.shape, dtype=jnp.float32)
    else:
        k_a, k_b = jax.random.split(k_enc)
        eps_a = jax.random.normal(k_a, x0_a.shape, dtype=jnp.float32)
        eps_b = jax.random.normal(k_b, x0_a.shape, dtype=jnp.float32)
    t_b = jnp.full((B,), t, dtype=jnp.int32)
    xt_a = gaussian.q_sample(schedule, x0_a, t_b, eps_a)
    xt_b = gaussian.q_sample(schedule, x0_b, t_b, eps_b)
    lam = lambdas.reshape((L, 1) + (1,) * x0_a.ndim)
    x_mix = ((1.0 - lam) * xt_a[None] + lam * xt_b[None]).reshape((L * B,) + x0_a.shape[1:])
    step = _ancestral_step(
        schedule,
        _identity_model_fn(denoise_fn),
        mean_type=mean_type,
        var_type=var_type,
        clip_denoised=clip_denoised,
    )
    out = _run_chain(step, x_mix, t, k_dec, progressive_every=None, noise_shape=x0_a.shape)
    return out.reshape((L,) + x0_a.shape)
