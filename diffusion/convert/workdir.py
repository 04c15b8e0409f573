"""Writing a converted model as a normal workdir: checkpoint, config.json, config.py."""

from __future__ import annotations

from typing import Optional

from diffusion import io
from diffusion.convert.common import ConversionError

# ----------------------------------------------------------------------------- writing
_CONFIG_PY = '''"""Config of this converted workdir: experiments/default.py updated with config.json beside it
(written by diffusion.convert), so every field keeps its type and can be overridden from the
command line (--config.data.data_dir=..., --config.eval.inception_weights=...).

    python launch.py --config {workdir}/config.py --workdir {workdir} --mode sample

launch.py --config takes a local file: for a gs:// workdir, copy this file out of the bucket
(e.g. `gcloud storage cp {workdir}/config.py .`) and pass the copy; without a config.json
beside it, it reads the one in WORKDIR.
"""
import os
import sys

import ml_collections

#: Where diffusion.convert wrote this file and config.json.
WORKDIR = {workdir!r}


def _tuples(x):
    if isinstance(x, dict):
        return {{k: _tuples(v) for k, v in x.items()}}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x


def _merge(config, saved):
    for key, value in saved.items():
        if isinstance(value, dict):
            if key not in config:
                config[key] = ml_collections.ConfigDict()
            _merge(config[key], value)
        elif value is None and key in config:
            continue   # keep the typed placeholder (overridable from the command line)
        else:
            config[key] = _tuples(value)


def get_config():
    import diffusion
    root = os.path.dirname(os.path.dirname(os.path.abspath(diffusion.__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from diffusion import io
    from experiments import default
    config = default.get_config()
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.json")
    _merge(config, io.read_json(here if io.isfile(here) else io.join(WORKDIR, "config.json")))
    return config
'''


def write_workdir(
    workdir: str, config, params, ema_params, step: int, report: Optional[dict] = None
) -> str:
    """Writes ``checkpoints/<step>`` (a TrainState), ``config.json``, ``config.py`` and
    ``convert_report.json`` into ``workdir`` (a local path or ``gs://...``: every file goes
    through `diffusion.io`, the checkpoint through Orbax). Refuses a workdir that already has
    checkpoints.

    The TrainState's tree is checked against ``jax.eval_shape(init_state(config, ...))`` so
    ``launch.py --mode sample/evaluate`` restores it. Returns the checkpoint directory.
    """
    import jax
    import jax.numpy as jnp

    from diffusion.checkpoint import Checkpointer
    from diffusion.factories import (
        TrainState,
        config_to_dict,
        create_model,
        init_state,
        make_optimizer,
    )

    workdir = io.absolute(workdir)
    ckpt_dir = io.join(workdir, "checkpoints")
    if io.isdir(ckpt_dir) and io.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} is not empty: convert into a new --workdir")
    model = create_model(config)
    tx = make_optimizer(config)
    params = jax.tree.map(jnp.asarray, params)
    ema_params = jax.tree.map(jnp.asarray, ema_params)
    state = TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        ema_params=ema_params,
        opt_state=tx.init(params),
    )
    want = jax.eval_shape(lambda: init_state(config, model, tx))
    got_s = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), state)
    want_s = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), want)
    if jax.tree.structure(got_s) != jax.tree.structure(want_s) or jax.tree.leaves(
        got_s
    ) != jax.tree.leaves(want_s):
        raise ConversionError("internal: the converted TrainState does not match init_state's")
    io.makedirs(workdir)
    cfg = config_to_dict(config)
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        ckpt.save(int(step), state, cfg)
        ckpt.wait()
    finally:
        ckpt.close()
    io.write_json(io.join(workdir, "config.json"), cfg, indent=2, sort_keys=True)
    io.write_text(io.join(workdir, "config.py"), _CONFIG_PY.format(workdir=workdir))
    if report is not None:
        io.write_json(io.join(workdir, "convert_report.json"), report, indent=2, sort_keys=True)
    return ckpt_dir
