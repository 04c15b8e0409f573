"""How the train step draws the timesteps t of a batch: uniformly, or by importance (`config.training.t_sampler`).

``uniform`` (the paper's Algorithm 1, the default): t ~ U{0, …, T−1}, every example weight 1.

``importance`` (Nichol & Dhariwal 2021, *Improved DDPM*, Sec. 3.3, their
``LossSecondMomentResampler``): the bound L = Σ_t L_t is a sum of terms of very different sizes,
so drawing t uniformly gives a noisy gradient. Keep the last H = ``training.t_sampler_history``
(10) values of each term L_t seen in training; once every t has H of them, draw

    p_t ∝ sqrt(E[L_t²])  (mean over the history),   then p ← (1 − u)·p + u/T   (u = 0.001)

and weight example b by w_b = 1 / (T · p_{t_b}), so that E_{t∼p}[w(t)·L_t] = (1/T)·Σ_t L_t:
the same objective in expectation as uniform sampling, with less variance. Before every t has H
values the draw is uniform (w = 1) and every drawn term goes into the history.

The history lives in the `TrainState` (``state.t_sampler``, replicated, saved with every
checkpoint), so a resumed run draws exactly what an uninterrupted one would. With ``uniform``
it is ``None`` (no leaves: the checkpoint tree is unchanged).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

T_SAMPLERS = ("uniform", "importance")
DEFAULT_HISTORY = 10  # Improved DDPM's history_per_term
DEFAULT_UNIFORM_PROB = 0.001  # Improved DDPM's uniform_prob

__all__ = [
    "T_SAMPLERS",
    "init_state",
    "probabilities",
    "draw",
    "update",
    "sampler_options",
]


def sampler_options(config) -> Tuple[str, int, float]:
    """``(kind, history, uniform_prob)`` from ``config.training`` (fields absent from configs
    written before the option existed read as the defaults)."""
    t = config.training
    return (
        t.get("t_sampler", "uniform") or "uniform",
        int(t.get("t_sampler_history", DEFAULT_HISTORY) or DEFAULT_HISTORY),
        float(t.get("t_sampler_uniform_prob", DEFAULT_UNIFORM_PROB)),
    )


def init_state(kind: str, num_timesteps: int, history: int = DEFAULT_HISTORY) -> Optional[Dict]:
    """The sampler's state: ``None`` for uniform; for importance ``{'history': [T, H] float32
    (the last H values of each L_t, in bits/dim), 'count': [T] int32 (how many were seen)}``."""
    if kind == "uniform":
        return None
    if kind != "importance":
        raise ValueError(f"unknown t_sampler {kind!r}; valid: {list(T_SAMPLERS)}")
    return {
        "history": jnp.zeros((num_timesteps, history), jnp.float32),
        "count": jnp.zeros((num_timesteps,), jnp.int32),
    }


def probabilities(state: Dict[str, Any], uniform_prob: float = DEFAULT_UNIFORM_PROB) -> jnp.ndarray:
    """p_t ``[T]``: uniform until every t has a full history, then ∝ sqrt(mean L_t²) mixed with
    ``uniform_prob`` of the uniform distribution (Improved DDPM Sec. 3.3)."""
    history, count = state["history"], state["count"]
    T, H = history.shape
    warm = jnp.all(count >= H)
    w = jnp.sqrt(jnp.mean(jnp.square(history), axis=-1))
    w = w / jnp.maximum(jnp.sum(w), 1e-30)
    p = w * (1.0 - uniform_prob) + uniform_prob / T
    p = p / jnp.sum(p)
    return jnp.where(warm, p, jnp.full((T,), 1.0 / T, jnp.float32))


def draw(
    key, state: Optional[Dict[str, Any]], batch: int, num_timesteps: int, uniform_prob: float
) -> Tuple[jnp.ndarray, Optional[jnp.ndarray]]:
    """t ``[B]`` int32 and the weights ``[B]`` (``None`` for uniform, i.e. all 1).

    Uniform: ``randint(key, (B,), 0, T)`` (the draw every run made before this option existed,
    so old runs resume bitwise). Importance: t ~ p (`probabilities`), w = 1 / (T p_t).
    """
    if state is None:
        return jax.random.randint(key, (batch,), 0, num_timesteps, dtype=jnp.int32), None
    p = probabilities(state, uniform_prob)
    t = jax.random.choice(key, num_timesteps, (batch,), replace=True, p=p).astype(jnp.int32)
    return t, 1.0 / (num_timesteps * p[t])


def update(state: Optional[Dict[str, Any]], t, losses) -> Optional[Dict[str, Any]]:
    """The history after seeing the terms ``losses`` ``[B]`` at timesteps ``t`` ``[B]``.

    In batch order, each L_{t_b} replaces the oldest of t_b's H values (a ring buffer: the kept
    values are the H most recent, as Improved DDPM's shift-and-append). Non-finite terms are not
    recorded. ``None`` (uniform) stays ``None``.
    """
    if state is None:
        return None
    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    H = state["history"].shape[1]

    def body(b, s):
        tb, lb = t[b], losses[b]
        ok = jnp.isfinite(lb)
        slot = s["count"][tb] % H
        hist = s["history"].at[tb, slot].set(jnp.where(ok, lb, s["history"][tb, slot]))
        count = s["count"].at[tb].add(ok.astype(jnp.int32))
        return {"history": hist, "count": count}

    return jax.lax.fori_loop(0, t.shape[0], body, state)
