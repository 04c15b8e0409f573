"""The authors' TF1 checkpoints (``--source tf``): variable names, config from tensor shapes,
reading (see `diffusion.convert` for the name layout)."""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from diffusion import io
from diffusion.convert.common import (
    _LEVEL,
    _MID,
    _RESAMPLE,
    ConversionError,
    Target,
    _build,
    _flat,
    _infer_base,
    _is_norm,
    _set_out_channels,
    abstract_params,
    base_config,
    match_tensors,
)

#: TF checkpoint variables that are training bookkeeping, not weights (never converted).
TF_BOOKKEEPING = re.compile(r"^(.*/)?(global_step|beta1_power|beta2_power)(_\d+)?$")
#: Optimizer slot suffixes of a weight ``<weight>/<slot>`` (Adam, Momentum, RMSProp, Adagrad).
TF_SLOT = re.compile(r"^(Adam|Adam_1|Momentum|RMSProp|RMSProp_1|Adagrad)$")
EMA_SUFFIX = "ExponentialMovingAverage"


def _tf_top(name: str) -> str:
    m = _LEVEL.match(name)
    if m:
        return f"{m[1]}_{m[2]}/{m[3]}_{m[4]}"
    m = _RESAMPLE.match(name)
    if m:
        return f"{m[1]}_{m[2]}/{m[3]}"
    m = _MID.match(name)
    if m:
        return f"mid/{m[1]}_{m[2]}"
    return name


def tf_name_map(params, scope: str = "model") -> Dict[Tuple[str, ...], Target]:
    """``{flax path: Target}`` for the released TF variable names (see the module docstring).

    ``params``: the (abstract) Flax param tree of `diffusion.models.unet.UNet`. TF shapes equal
    the Flax shapes (conv W is HWIO, dense/nin W is [in, out]); GroupNorm gamma/beta -> scale/bias.
    """
    out = {}
    for path, leaf in _flat(params).items():
        *mods, name = path
        module = mods[-1]
        if _is_norm(module):
            tf_leaf = {"scale": "gamma", "bias": "beta"}[name]
        else:
            tf_leaf = {"kernel": "W", "bias": "b"}[name]
        parts = [scope, _tf_top(mods[0]), *mods[1:], tf_leaf]
        out[path] = Target((("/".join(p for p in parts if p)),), tuple(leaf.shape), "copy")
    return out


def config_from_tf_shapes(
    shapes: Dict[str, Tuple[int, ...]],
    scope: str,
    base: Optional[str] = None,
    image_size: Optional[int] = None,
    *,
    source: str = "the TF checkpoint",
):
    """Our config for a TF checkpoint, the model fields read off its variable shapes.

    ch = conv_in's out width; levels = the ``down_{l}`` scopes; ch_mult = each level's
    block_0/conv1 width / ch; num_res_blocks = the ``down_0/block_{i}`` count; attention levels
    = those with ``down_{l}/attn_0``, at ``image_size / 2**l`` (the image size is not in the
    weights: the base experiment's, or ``image_size``). ``source`` names the checkpoint in
    messages.
    """
    p = scope + "/" if scope else ""
    try:
        ch = int(shapes[f"{p}conv_in/W"][3])
        in_ch = int(shapes[f"{p}conv_in/W"][2])
        out_ch = int(shapes[f"{p}conv_out/W"][3])
    except KeyError as e:
        raise ConversionError(
            f"{e.args[0]} not in the checkpoint: not a DDPM U-Net under the "
            f"scope {scope!r}? (pass --scope)"
        ) from None
    levels = sorted(
        {int(m[1]) for n in shapes for m in [re.match(rf"^{re.escape(p)}down_(\d+)/", n)] if m}
    )
    if levels != list(range(len(levels))) or not levels:
        raise ConversionError(f"down_* scopes {levels} are not 0..L-1")
    ch_mult, attn_levels = [], []
    for lvl in levels:
        w = shapes.get(f"{p}down_{lvl}/block_0/conv1/W")
        if w is None:
            raise ConversionError(f"{p}down_{lvl}/block_0/conv1/W not in the checkpoint")
        if int(w[3]) % ch:
            raise ConversionError(
                f"{p}down_{lvl}/block_0/conv1/W width {w[3]} is not a multiple of ch={ch}"
            )
        ch_mult.append(int(w[3]) // ch)
        if f"{p}down_{lvl}/attn_0/q/W" in shapes:
            attn_levels.append(lvl)
    nrb = len(
        {m[1] for n in shapes for m in [re.match(rf"^{re.escape(p)}down_0/block_(\d+)/", n)] if m}
    )
    config = base_config(base or _infer_base(image_size, len(levels), source))
    size = int(image_size or config.data.image_size)
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks = ch, tuple(ch_mult), nrb
    m.attn_resolutions = tuple(size // 2**lvl for lvl in attn_levels)
    m.resamp_with_conv = (
        any(n.startswith(f"{p}down_0/downsample/conv/") for n in shapes) or len(levels) == 1
    )
    config.data.image_size = size
    config.data.channels = in_ch
    _set_out_channels(config, out_ch)
    return config


def _tf_checkpoint_path(path: str) -> str:
    import tensorflow as tf

    if io.isdir(path):
        found = tf.train.latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"No TF checkpoint in {path} (no 'checkpoint' file); pass "
                "the prefix, e.g. .../model.ckpt-790000"
            )
        return found
    for suffix in (".index", ".meta"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    if ".data-" in path:
        path = path.split(".data-")[0]
    if not io.isfile(path + ".index"):
        raise FileNotFoundError(
            f"{path}.index not found: pass the checkpoint prefix (model.ckpt-<step>) or its folder"
        )
    return path


def _tf_read_error(prefix: str, e: BaseException, name: Optional[str] = None) -> ConversionError:
    """The ConversionError for a TF checkpoint whose files TensorFlow cannot read."""
    what = f"reading {name}" if name else "opening it"
    return ConversionError(
        f"TF checkpoint {prefix}: its .index or .data-* file is truncated or corrupt "
        f"({what}: {type(e).__name__}: {' '.join(str(e).split())}); download it again "
        "(all model.ckpt-<step>.* files of one step)"
    )


def _detect_scope(shapes) -> str:
    hits = sorted(
        n[: -len("temb/dense0/W")].rstrip("/") for n in shapes if n.endswith("temb/dense0/W")
    )
    if len(hits) != 1:
        raise ConversionError(
            f"Cannot tell the model scope: variables ending in temb/dense0/W: "
            f"{hits or 'none'}; pass --scope"
        )
    return hits[0]


def load_tf(
    path: str,
    base: Optional[str] = None,
    *,
    scope: Optional[str] = None,
    image_size: Optional[int] = None,
    ema_suffix: str = EMA_SUFFIX,
    allow_missing_ema: bool = False,
    ignore: Sequence[str] = (),
):
    """``(config, params, ema_params, step, report)`` from a released TF1 checkpoint.

    Raw weights -> params, ``<weight>/<ema_suffix>`` -> ema_params, ``global_step`` -> step.
    Without any EMA variable, ``allow_missing_ema`` copies params to ema_params (else an
    error). ``ignore``: regexes of further source names not to convert.
    """
    import tensorflow as tf

    prefix = _tf_checkpoint_path(path)
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
    except (tf.errors.OpError, RuntimeError, ValueError, IndexError) as e:
        raise _tf_read_error(prefix, e) from None

    def get(name: str) -> np.ndarray:
        try:
            return reader.get_tensor(name)
        except (tf.errors.OpError, RuntimeError, ValueError, IndexError) as e:
            raise _tf_read_error(prefix, e, name) from None

    scope = _detect_scope(shapes) if scope is None else scope
    config = config_from_tf_shapes(
        shapes, scope, base, image_size, source=f"TF checkpoint {prefix}"
    )
    name_map = tf_name_map(abstract_params(config), scope)
    weights = {n for t in name_map.values() for n in t.names}
    ema_map = {
        path: dataclasses.replace(t, names=tuple(f"{n}/{ema_suffix}" for n in t.names))
        for path, t in name_map.items()
    }
    has_ema = any(n.endswith("/" + ema_suffix) for n in shapes)
    ignore_re = [re.compile(r) for r in ignore]

    def bookkeeping(n: str) -> bool:
        if TF_BOOKKEEPING.match(n) or any(r.search(n) for r in ignore_re):
            return True
        head, _, tail = n.rpartition("/")
        if TF_SLOT.match(tail) and (head in weights or head.endswith("/" + ema_suffix)):
            return True
        return False

    raw_src = {n: s for n, s in shapes.items() if not n.endswith("/" + ema_suffix)}
    ema_src = {n: s for n, s in shapes.items() if n.endswith("/" + ema_suffix)}
    chosen, skipped = match_tensors(
        name_map, raw_src, ignored=bookkeeping, what=f"TF checkpoint {prefix} (raw weights)"
    )
    params = _build(name_map, chosen, get)
    if has_ema:
        ema_chosen, ema_skipped = match_tensors(
            ema_map,
            ema_src,
            ignored=bookkeeping,
            what=f"TF checkpoint {prefix} (EMA, */{ema_suffix})",
        )
        ema_params = _build(ema_map, ema_chosen, get)
        skipped += ema_skipped
        ema_note = f"ema_params from the {len(ema_chosen)} */{ema_suffix} shadow variables"
    elif allow_missing_ema:
        ema_params = params
        ema_note = "no EMA variables in the checkpoint: params copied to ema_params"
    else:
        raise ConversionError(
            f"{prefix} has no */{ema_suffix} (EMA) variables; pass "
            "--allow-missing-ema to use the raw weights as the EMA weights"
        )
    step = 0
    for n in ("global_step", f"{scope}/global_step"):
        if n in shapes:
            step = int(np.asarray(get(n)).reshape(()))
            break
    report = {
        "source": "tf",
        "input": prefix,
        "scope": scope,
        "tensors": len(shapes),
        "converted": len(chosen) + (len(ema_chosen) if has_ema else 0),
        "not_converted": skipped,
        "ema": ema_note,
        "step": step,
    }
    return config, params, ema_params, step, report
