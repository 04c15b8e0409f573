"""Every random stream of a run, named in one place.

All randomness is stateless and derived from ``config.seed``: a stream is
``fold_in(key(seed), SALT)`` (JAX) or ``default_rng([seed, ..., SALT])`` (NumPy, the input
pipeline). A salt is a fixed constant, so a stream is the same in every launch, on every number
of devices and after a resume; distinct salts make the streams independent. Changing a value here
changes the numbers a run produces (initial parameters, sample grids, evaluation samples), so
they are frozen: add new streams, do not renumber old ones.

One overlap is known and kept (changing it would change every run's numbers): the train step's
key ``fold_in(key(seed), step)`` equals a named stream's key at ``step == salt`` (steps 2973 =
``0xB9D``, 5143 = ``0x1417``, 23102 = ``0x5A3E``). The uses differ — the step splits its key into
t, ε and dropout keys; the streams draw parameters, chains or bound noise from theirs — so no
random number is used twice for the same purpose.

=====================  ==============  ======================================================
stream                 salt            used by
=====================  ==============  ======================================================
parameter init         ``0x1417``      `factories.init_state` (``model.init``)
train step             (none)          the step key is ``fold_in(key(seed), step)``
training sample grid   ``2**31 - 1``   the EMA grid PNG: the same noise at every checkpoint
evaluation samples     ``0x5A3E``      `evaluation.generator`: the same noise for every step
bits/dim noise         ``0xB9D``       `evaluation.evaluators` (then ``fold_in(batch index)``)
data flips             ``1``           ``default_rng([seed, step, 1])`` in `data.pipeline`
data order             (none)          ``default_rng([seed, epoch])`` in `data.pipeline`
reproduce: Fig. 6      ``seed + 7``    `experiments.reproduce` progressive x̂_0 panel
reproduce: Fig. 8      ``seed + 8``    `experiments.reproduce` interpolation panel
=====================  ==============  ======================================================
"""

from __future__ import annotations

import jax

__all__ = [
    "PARAM_INIT",
    "GRID_SAMPLES",
    "EVAL_SAMPLES",
    "BPD_NOISE",
    "DATA_FLIP",
    "FIG6_SEED_OFFSET",
    "FIG8_SEED_OFFSET",
    "stream",
]

PARAM_INIT = 0x1417
GRID_SAMPLES = 2**31 - 1
EVAL_SAMPLES = 0x5A3E
BPD_NOISE = 0xB9D
DATA_FLIP = 1
FIG6_SEED_OFFSET = 7
FIG8_SEED_OFFSET = 8


def stream(seed: int, salt: int) -> jax.Array:
    """The key of one named stream: ``fold_in(key(seed), salt)`` (a typed PRNG key, shape [])."""
    return jax.random.fold_in(jax.random.key(seed), salt)
