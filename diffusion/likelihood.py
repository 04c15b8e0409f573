"""The full variational bound of DDPM in bits/dim (paper Eq. 5, Table 1's NLL) and the data of the
rate–distortion curve (Fig. 5, Table 4), as one ``lax.scan`` over all T steps — the released
code's ``calc_bpd_loop``; and an unbiased estimate of the same bound from K random steps per
example with its standard error (`bound_estimate`, K + 1 network calls instead of T), with
`aggregate_bound_estimates` for the dataset mean.

``denoise_fn(x_t [B, ...], t int32 [B]) -> [B, ..., C or 2C]`` as in `diffusion.sampling`;
``x0`` holds data in [−1, 1] (8-bit data for the discrete decoder term to be a code length).
Wrap in ``jax.jit`` (closing over ``denoise_fn`` and the keyword options).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import gaussian
from diffusion.losses import mean_flat, prior_bpd, vb_terms_bpd
from diffusion.schedules import Schedule

__all__ = ["bits_per_dim", "rate_distortion", "bound_estimate", "aggregate_bound_estimates"]


def bits_per_dim(
    schedule: Schedule,
    denoise_fn: Callable,
    x0,
    key,
    *,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
) -> Dict[str, jnp.ndarray]:
    """Every term of the variational bound (paper Eq. 5) for each example, in bits/dim.

    L = L_T + Σ_{t>0} L_{t−1} + L_0: for code index t = T−1 down to 0 (one ``lax.scan``, T network
    calls), x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with fresh ε from ``fold_in(key, t)`` (Eq. 4), then
    `losses.vb_terms_bpd`: KL(q(x_{t−1}|x_t,x_0) ‖ pθ(x_{t−1}|x_t)) for t > 0 and the discretized
    decoder NLL −log pθ(x_0|x_1) (Eq. 13) at t = 0; the prior term L_T = KL(q(x_T|x_0) ‖ N(0, I)).
    ``clip_denoised`` defaults to False (the bound of the unclipped model, as the ``kl`` training
    loss uses; the released ``calc_bpd_loop`` defaults to True).

    Args:
      schedule: `Schedule` with T steps.
      denoise_fn: ``(x_t [B, ...], t int32 [B]) -> [B, ..., C or 2C]``.
      x0: ``[B, ...]`` data in [−1, 1].
      key: PRNG key.
      mean_type, var_type: as in `gaussian.p_mean_variance`.

    Returns:
      dict with ``total_bpd`` ``[B]`` (= Σ_t terms + prior), ``terms_bpd`` ``[B, T]`` (column t is
      L_{t−1} in the paper's numbering; column 0 is the decoder NLL), ``prior_bpd`` ``[B]`` and
      ``mse`` ``[B, T]`` (mean over pixels of (x̂_0(x_t, t) − x_0)², the distortion at step t) and
      ``mse_clipped`` ``[B, T]`` (the same with x̂_0 clipped to [−1, 1], the receiver's image
      estimate of Fig. 5; unclipped x̂_0 from ε at t ≈ T is ε̂'s error amplified by 1/√ᾱ_t).
    """
    gaussian.check_types(mean_type, var_type)
    x0 = jnp.asarray(x0, jnp.float32)
    B, T = x0.shape[0], schedule.num_timesteps

    def body(carry, t):
        t_b = jnp.full((B,), t, dtype=jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, dtype=jnp.float32)
        x_t = gaussian.q_sample(schedule, x0, t_b, noise)
        terms, pred_xstart = vb_terms_bpd(
            schedule,
            denoise_fn(x_t, t_b),
            x0,
            x_t,
            t_b,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )
        return carry, (
            terms,
            mean_flat(jnp.square(pred_xstart - x0)),
            mean_flat(jnp.square(jnp.clip(pred_xstart, -1.0, 1.0) - x0)),
        )

    _, (terms_tb, mse_tb, msec_tb) = jax.lax.scan(
        body, None, jnp.arange(T - 1, -1, -1, dtype=jnp.int32)
    )
    terms_bt = terms_tb[::-1].T  # scan ran t = T−1..0; column t is step t
    prior = prior_bpd(schedule, x0)
    return {
        "total_bpd": jnp.sum(terms_bt, axis=1) + prior,
        "terms_bpd": terms_bt,
        "prior_bpd": prior,
        "mse": mse_tb[::-1].T,
        "mse_clipped": msec_tb[::-1].T,
    }


def rate_distortion(bpd: Dict[str, jnp.ndarray]) -> Dict[str, jnp.ndarray]:
    """Rate–distortion data from a `bits_per_dim` result (paper Sec. 4.3, Fig. 5, Table 4).

    Progressive coding (Algorithms 3–4) sends x_{T−1}, x_{T−2}, ... (code indices); the term in
    column s of ``terms_bpd`` is the cost of sending x_{s−1} given x_s, so once x_t has been
    received the rate is L_T + Σ_{s > t} terms[s] and the receiver's estimate x̂_0(x_t) has
    distortion RMSE = √mse_t · 127.5 on the [0, 255] scale. Table 4's split: ``rate`` =
    prior + Σ_{t>0} terms (= ``rate_bpd[:, 0]``), ``distortion`` = the decoder term terms[:, 0]
    (bits/dim); rate + distortion = total_bpd.

    Returns dict: ``rate_bpd`` ``[B, T]``, ``distortion_rmse`` ``[B, T]`` (0–255 scale),
    ``rate`` ``[B]``, ``distortion`` ``[B]``.
    """
    terms = bpd["terms_bpd"]
    prior = bpd["prior_bpd"]
    after = jnp.cumsum(terms[:, ::-1], axis=1)[:, ::-1] - terms  # Σ_{s > t}
    return {
        "rate_bpd": after + prior[:, None],
        "distortion_rmse": jnp.sqrt(bpd["mse"]) * 127.5,
        "rate": jnp.sum(terms[:, 1:], axis=1) + prior,
        "distortion": terms[:, 0],
    }


# fold_in data of the key that picks the sampled steps: no step index t < T can equal it, so the
# choice is independent of every ε (those come from fold_in(key, t), as in `bits_per_dim`).
_STEP_CHOICE_SALT = 2**31 - 1


def _check_num_sampled(k, num_timesteps: int) -> int:
    n = num_timesteps - 1
    if n < 1:
        raise ValueError(
            f"bound_estimate needs a schedule with T >= 2 steps, got T = {num_timesteps}"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(
            f"num_sampled_timesteps must be an integer in [1, T-1] = [1, {n}] "
            f"(T = {num_timesteps}), got {k!r}"
        )
    return int(k)


def bound_estimate(
    schedule: Schedule,
    denoise_fn: Callable,
    x0,
    key,
    *,
    num_sampled_timesteps: int,
    mean_type: str,
    var_type: str,
    clip_denoised: bool = False,
) -> Dict[str, jnp.ndarray]:
    """Unbiased estimate of `bits_per_dim`'s ``total_bpd`` (the bound of paper Eq. 5) per example
    from K = ``num_sampled_timesteps`` random steps, with its standard error; K + 1 network calls
    instead of T.

    In `bits_per_dim`'s code indices, L = L_T + Σ_{t=0}^{T−1} term_t (Eq. 5), term_t being column t
    of its ``terms_bpd``: KL(q(x_{t−1}|x_t,x_0) ‖ pθ(x_{t−1}|x_t)) for t > 0 and the decoder NLL
    −log pθ(x_0|x_1) at t = 0. Here the prior L_T is exact (no network call), the decoder term_0 is
    exact (one call), and the sum over the N = T − 1 indices t = 1..T−1 is estimated from a sample
    S_b of K of them drawn uniformly WITHOUT replacement for each example b (the first K of a
    random permutation):
      total_b = L_T + term_0 + (N/K) Σ_{t∈S_b} term_t,
      se_b    = N · √((1 − K/N) · s_b²/K),   s_b² = sample variance (ddof 1) of the K sampled terms
    (the finite-population correction makes K = N the exact bound with se 0; K = 1 < N gives
    se = NaN, a variance needs two terms). ε for the term at t is example b's row of
    ``normal(fold_in(key, t), x0.shape)`` — exactly `bits_per_dim`'s noise — and S_b comes from
    a key independent of every ε, so given ``key`` each term is the one `bits_per_dim(…, key)` would
    compute: ``total_bpd`` is unbiased for `bits_per_dim`'s ``total_bpd`` with the same key (and so
    for the bound's expectation over ε), equal to it (to float32 rounding) at K = T − 1, and
    ``total_bpd_se`` is the standard error of the step sampling only, i.e. of total_b around
    `bits_per_dim`'s total for this key (ε's own Monte-Carlo spread, which `bits_per_dim` has too,
    is not in it; see `aggregate_bound_estimates` for a dataset-level error bar that includes it).
    se_b² is unbiased for the variance, but se_b is itself a K-term estimate: when a few terms
    dominate (the small-t ones usually do) it is mostly too small and now and then large (with
    K = 3 of 19 in the tests, mean se_b ≈ 0.4 × the std while √E[se_b²] matches it), so trust
    the root-mean-square or the dataset aggregate rather than one example's se_b.

    One ``lax.scan`` of T steps draws the batch noise of every t (T·B·D normals, as `bits_per_dim`)
    into a ``[K+1, B, ...]`` buffer (memory: K + 1 batches of x0), then one ``lax.scan`` of K + 1
    network calls on the whole batch, each example at its own t. Pure; jit with K static (closing
    over ``denoise_fn`` and the keyword options).

    Args:
      schedule: `Schedule` with T ≥ 2 steps.
      denoise_fn: ``(x_t [B, ...], t int32 [B]) -> [B, ..., C or 2C]``.
      x0: ``[B, ...]`` data in [−1, 1].
      key: PRNG key (the same as `bits_per_dim`'s to reproduce its noise).
      num_sampled_timesteps: K, a Python int in [1, T−1]; ValueError otherwise.
      mean_type, var_type, clip_denoised: as in `bits_per_dim`.

    Returns:
      dict with ``total_bpd`` ``[B]`` (the estimate), ``total_bpd_se`` ``[B]``, ``prior_bpd``
      ``[B]`` (L_T), ``decoder_bpd`` ``[B]`` (the t = 0 term), ``timesteps`` int32 ``[B, K]`` (the
      sampled code indices, in draw order), ``terms_bpd`` ``[B, K]`` (the term at each of them, =
      `bits_per_dim`'s ``terms_bpd[b, timesteps[b, k]]``) and ``num_sampled_timesteps`` (K).
    """
    gaussian.check_types(mean_type, var_type)
    x0 = jnp.asarray(x0, jnp.float32)
    B, T = x0.shape[0], schedule.num_timesteps
    K = _check_num_sampled(num_sampled_timesteps, T)
    N = T - 1

    # S_b: the first K of a random permutation of 1..T−1, one per example.
    choice_keys = jax.random.split(jax.random.fold_in(key, _STEP_CHOICE_SALT), B)
    sampled = jax.vmap(lambda k: jax.random.permutation(k, N)[:K])(choice_keys)
    sampled = sampled.astype(jnp.int32) + 1  # [B, K]
    # Position p = 0..K of each (example, t) in the network scan: 0 is t = 0 (the decoder, every
    # example), p = k + 1 is sampled[:, k]; K + 1 (out of range, dropped) where t is not sampled.
    rows = jnp.arange(B)
    position = jnp.full((B, T), K + 1, jnp.int32).at[:, 0].set(0)
    position = position.at[rows[:, None], sampled].set(jnp.arange(1, K + 1, dtype=jnp.int32))

    def draw(buf, t):  # bits_per_dim's ε for step t, each row to where its example uses t
        noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, dtype=jnp.float32)
        return buf.at[position[:, t], rows].set(noise, mode="drop"), None

    noise, _ = jax.lax.scan(
        draw, jnp.zeros((K + 1,) + x0.shape, jnp.float32), jnp.arange(T, dtype=jnp.int32)
    )
    steps = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), sampled], axis=1).T  # [K+1, B]

    def body(carry, xs):
        t_b, eps = xs
        x_t = gaussian.q_sample(schedule, x0, t_b, eps)
        terms, _ = vb_terms_bpd(
            schedule,
            denoise_fn(x_t, t_b),
            x0,
            x_t,
            t_b,
            mean_type=mean_type,
            var_type=var_type,
            clip_denoised=clip_denoised,
        )
        return carry, terms

    _, terms_pb = jax.lax.scan(body, None, (steps, noise))  # [K+1, B]
    decoder, terms = terms_pb[0], terms_pb[1:].T  # [B], [B, K]
    estimate = jnp.sum(terms, axis=1) * (N / K)  # N/K = 1.0 exactly at K = N
    if K == N:
        se = jnp.zeros((B,), jnp.float32)
    elif K == 1:
        se = jnp.full((B,), jnp.nan, jnp.float32)
    else:
        dev = terms - jnp.mean(terms, axis=1, keepdims=True)
        s2 = jnp.sum(jnp.square(dev), axis=1) / (K - 1)
        se = N * jnp.sqrt((1.0 - K / N) * s2 / K)
    prior = prior_bpd(schedule, x0)
    return {
        "total_bpd": prior + decoder + estimate,
        "total_bpd_se": se,
        "prior_bpd": prior,
        "decoder_bpd": decoder,
        "timesteps": sampled,
        "terms_bpd": terms,
        "num_sampled_timesteps": K,
    }


def aggregate_bound_estimates(
    estimates: Union[Mapping[str, jnp.ndarray], Iterable[Mapping[str, jnp.ndarray]]],
) -> Dict[str, float]:
    """Dataset mean of `bound_estimate` results (one dict or an iterable of per-batch dicts; drop
    padded rows first) and two standard errors of it, in bits/dim (host-side, float64).

    With Y_i = ``total_bpd`` of example i (i = 1..N) and se_i its ``total_bpd_se``:
      ``total_bpd``    = Ȳ = mean_i Y_i;
      ``total_bpd_se`` = std(Y, ddof 1)/√N, the between-example spread: the standard error of Ȳ
          as an estimate of the expected bound over the data distribution, E_{x_0}E_ε[L(x_0)]
          (the NLL bound of Table 1). Y_i varies with the example, with ε and with the sampled
          steps, independently across examples, so Var(Y_i) = Var_x0(bound) + E[ε spread] +
          E[se_i²] and this one number carries all three (the full bound's usual error bar
          plus the step sampling); it is valid for any K, K = 1 included. It is NOT the error
          relative to the full bound of these same N examples — the spread of the per-example
          bounds is no error there. Independence needs a different key per batch (e.g.
          ``fold_in(key, batch_index)``): with one key, example b of every batch gets the same
          steps and ε;
      ``timestep_se``  = √(Σ_i se_i²)/N: the standard error of Ȳ around the mean of
          `bits_per_dim`'s ``total_bpd`` over the same examples and keys (step sampling only;
          independent across examples given ε, so the variances add); NaN when K = 1 < T − 1;
      ``num_examples`` = N and ``num_sampled_timesteps`` = K (a list if the batches differ).
    """
    if isinstance(estimates, Mapping):
        estimates = [estimates]
    estimates = list(estimates)
    if not estimates:
        raise ValueError("aggregate_bound_estimates needs at least one bound_estimate result")
    y = np.concatenate([np.asarray(e["total_bpd"], np.float64).reshape(-1) for e in estimates])
    se = np.concatenate([np.asarray(e["total_bpd_se"], np.float64).reshape(-1) for e in estimates])
    n = y.size
    if n == 0:
        raise ValueError("aggregate_bound_estimates got no examples")
    ks = sorted({int(e["num_sampled_timesteps"]) for e in estimates})
    return {
        "total_bpd": float(np.mean(y)),
        "total_bpd_se": float(np.std(y, ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
        "timestep_se": float(math.sqrt(np.sum(np.square(se))) / n),
        "num_examples": n,
        "num_sampled_timesteps": ks[0] if len(ks) == 1 else ks,
    }
