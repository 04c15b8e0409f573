"""Released DDPM weights -> a normal workdir checkpoint (``python -m diffusion.convert``).

Two sources of the same models (CIFAR10, CelebA-HQ, LSUN church / bedroom / cat):

* ``tf``: the authors' TF1 name-based checkpoints (``model.ckpt-<step>.index/.data-*``, release
  of hojonathanho/diffusion), read with ``tf.train.load_checkpoint``. Variable names follow
  ``diffusion_tf/models/unet.py`` under the ``model`` variable scope (``scripts/run_*.py`` call
  ``unet.model(..., name='model')``)::

      model/temb/dense{0,1}/{W,b}                  W [in, out]
      model/conv_in/{W,b}                          W [3, 3, in, out] (HWIO)
      model/down_{l}/block_{i}/{norm1,norm2}/{gamma,beta}        (tf.contrib group_norm)
      model/down_{l}/block_{i}/{conv1,conv2}/{W,b}
      model/down_{l}/block_{i}/temb_proj/{W,b}
      model/down_{l}/block_{i}/nin_shortcut/{W,b}  W [in, out]   (when the width changes)
      model/down_{l}/attn_{i}/norm/{gamma,beta}, .../{q,k,v,proj_out}/{W,b}
      model/down_{l}/downsample/conv/{W,b}
      model/mid/{block_1,attn_1,block_2}/...
      model/up_{l}/block_{i}/..., model/up_{l}/attn_{i}/..., model/up_{l}/upsample/conv/{W,b}
      model/norm_out/{gamma,beta}, model/conv_out/{W,b}

  The EMA (``tpu_utils.make_ema``: ``tf.train.ExponentialMovingAverage(...).apply(trainable)``)
  keeps one shadow variable per weight named ``<weight>/ExponentialMovingAverage``; those become
  ``ema_params``, the raw weights ``params``; ``global_step`` becomes the step. Adam's slots
  (``<weight>/Adam``, ``<weight>/Adam_1``), ``beta1_power``, ``beta2_power`` and ``global_step``
  are known bookkeeping and are not converted (the optimizer state starts fresh).
* ``diffusers``: a folder with ``config.json`` + ``diffusion_pytorch_model.safetensors`` (e.g.
  ``google/ddpm-cifar10-32``), read with the safetensors NumPy API (no torch). Conv weights are
  OIHW (-> HWIO), Linear weights [out, in] (-> [in, out]), 1x1 conv shortcuts [out, in, 1, 1];
  the attention may use the current (``to_q/to_k/to_v/to_out.0``) or the deprecated
  (``query/key/value/proj_attn``) names. This format holds ONE set of weights (the published
  ones are the EMA weights of the TF checkpoints): they are written as both ``params`` and
  ``ema_params``, and the step is 0. The ``config.json`` fields are checked against what our
  U-Net computes (single-head attention, GroupNorm(32, eps 1e-6), TF 'SAME' stride-2 padding =
  ``downsample_padding`` 0, sin-first embedding with ``freq_shift`` 1, ...); a field it cannot
  reproduce is an error naming the field.

Every tensor of the source is consumed exactly once with the right shape; what does not fit
(missing, unexpected, wrong shape, duplicated) is listed by name in a `ConversionError`.

The config is a base experiment (``experiments/<base>.py``, or inferred: 32x32 -> cifar10,
256x256 -> celebahq256; LSUN needs ``--base lsun_church`` etc. for its data set) with the model
fields taken from the weights (diffusers ``config.json``, or the TF tensor shapes). The workdir
gets ``checkpoints/<step>/`` (a `diffusion.factories.TrainState`: params, ema_params, a fresh Adam
state, step), ``config.json`` and ``config.py`` (loads that JSON, for ``launch.py --config``).
The workdir may be ``gs://bucket/...``: every file is written through `diffusion.io`, the
checkpoint through Orbax (`diffusion.checkpoint.Checkpointer`)::

    python -m diffusion.convert --source diffusers --input ddpm-cifar10-32/ --workdir W
    python -m diffusion.convert --source tf --input diffusion_cifar10_model/model.ckpt-790000 \\
        --workdir W --base cifar10
    python launch.py --config W/config.py --workdir W --mode sample
    python launch.py --config W/config.py --workdir W --mode evaluate
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from diffusion import io

__all__ = [
    "ConversionError",
    "Target",
    "tf_name_map",
    "diffusers_name_map",
    "match_tensors",
    "abstract_params",
    "load_diffusers",
    "load_tf",
    "config_from_diffusers",
    "config_from_tf_shapes",
    "base_config",
    "convert",
    "write_workdir",
    "main",
    "EMA_SUFFIX",
    "DIFFUSERS_WEIGHTS",
    "DIFFUSERS_CONFIG",
]

EMA_SUFFIX = "ExponentialMovingAverage"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"
#: TF checkpoint variables that are training bookkeeping, not weights (never converted).
TF_BOOKKEEPING = re.compile(r"^(.*/)?(global_step|beta1_power|beta2_power)(_\d+)?$")
#: Optimizer slot suffixes of a weight ``<weight>/<slot>`` (Adam, Momentum, RMSProp, Adagrad).
TF_SLOT = re.compile(r"^(Adam|Adam_1|Momentum|RMSProp|RMSProp_1|Adagrad)$")
BASES = ("cifar10", "celebahq256", "lsun_church", "lsun_bedroom", "lsun_cat", "emoji32")


class ConversionError(ValueError):
    """The weights do not fit the model: the message names every tensor/field that does not."""


# ----------------------------------------------------------------------------- name maps
@dataclasses.dataclass(frozen=True)
class Target:
    """Where one Flax parameter comes from.

    names: candidate source names (the first present one is used; several only for the
      diffusers attention's current/deprecated names).
    shape: the expected source shape of the first name.
    transform: source array -> Flax array (transpose/reshape), or None for identity.
    alt_shapes: other accepted source shapes (e.g. a 1x1 conv for a Linear), same transform.
    """

    names: Tuple[str, ...]
    shape: Tuple[int, ...]
    kind: str  # 'conv' | 'dense' | 'norm' | 'copy'
    alt_shapes: Tuple[Tuple[int, ...], ...] = ()

    def transform(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if self.kind == "conv" and a.ndim == 4:  # OIHW -> HWIO
            return np.transpose(a, (2, 3, 1, 0))
        if self.kind == "dense" and a.ndim == 4:  # 1x1 conv [out, in, 1, 1] -> [in, out]
            return a[:, :, 0, 0].T
        if self.kind == "dense" and a.ndim == 2:  # Linear [out, in] -> [in, out]
            return a.T
        return a


def _flat(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat: Dict[Tuple[str, ...], Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def _is_norm(module: str) -> bool:
    return module.startswith("norm")


_LEVEL = re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$")
_RESAMPLE = re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$")
_MID = re.compile(r"^mid_(block|attn)_(\d+)$")


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


_DIFFUSERS_RES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "conv1": "conv1",
    "conv2": "conv2",
    "temb_proj": "time_emb_proj",
    "nin_shortcut": "conv_shortcut",
}
_DIFFUSERS_ATTN = {
    "norm": ("group_norm",),
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "proj_out": ("to_out.0", "proj_attn"),
}


def diffusers_name_map(params) -> Dict[Tuple[str, ...], Target]:
    """``{flax path: Target}`` for the diffusers ``UNet2DModel`` state-dict names.

    ``up_{l}`` of ours is ``up_blocks.{L-1-l}`` there (diffusers numbers the up path from the
    bottom). Shapes are the torch ones: conv OIHW, Linear [out, in] (``conv_shortcut`` is a 1x1
    conv [out, in, 1, 1]).
    """
    flat = _flat(params)
    levels = 1 + max(int(m[2]) for p in flat for m in [_LEVEL.match(p[0])] if m and m[1] == "down")
    out = {}
    for path, leaf in flat.items():
        *mods, name = path
        top, sub = mods[0], mods[1:]
        shape = tuple(leaf.shape)
        m_lvl, m_res, m_mid = _LEVEL.match(top), _RESAMPLE.match(top), _MID.match(top)
        if m_lvl or m_mid:
            if m_lvl:
                side, lvl, what, idx = m_lvl[1], int(m_lvl[2]), m_lvl[3], int(m_lvl[4])
                blk = f"down_blocks.{lvl}" if side == "down" else f"up_blocks.{levels - 1 - lvl}"
            else:
                blk, what, idx = "mid_block", m_mid[1], int(m_mid[2]) - 1
            if what == "block":
                prefixes = (f"{blk}.resnets.{idx}.{_DIFFUSERS_RES[sub[0]]}",)
            else:
                prefixes = tuple(f"{blk}.attentions.{idx}.{n}" for n in _DIFFUSERS_ATTN[sub[0]])
            module = sub[0]
        elif m_res:
            side, lvl = m_res[1], int(m_res[2])
            blk = (
                f"down_blocks.{lvl}.downsamplers.0"
                if side == "down"
                else f"up_blocks.{levels - 1 - lvl}.upsamplers.0"
            )
            prefixes, module = (f"{blk}.{sub[0]}",), sub[0]
        elif top == "temb":
            prefixes = (
                {"dense0": "time_embedding.linear_1", "dense1": "time_embedding.linear_2"}[sub[0]],
            )
            module = sub[0]
        else:
            prefixes = (
                {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}[top],
            )
            module = top
        if _is_norm(module):
            leaf_name, kind, tshape, alt = (
                {"scale": "weight", "bias": "bias"}[name],
                "norm",
                shape,
                (),
            )
        elif name == "bias":
            leaf_name, kind, tshape, alt = "bias", "copy", shape, ()
        elif len(shape) == 4:
            leaf_name, kind, alt = "weight", "conv", ()
            tshape = (shape[3], shape[2], shape[0], shape[1])
        else:
            leaf_name, kind = "weight", "dense"
            tshape, alt = (shape[1], shape[0]), ((shape[1], shape[0], 1, 1),)
        if module == "nin_shortcut" and name == "kernel":  # a 1x1 conv in diffusers
            tshape, alt = (shape[1], shape[0], 1, 1), ((shape[1], shape[0]),)
        out[path] = Target(tuple(f"{p}.{leaf_name}" for p in prefixes), tshape, kind, alt)
    return out


def match_tensors(
    name_map: Dict[Tuple[str, ...], Target],
    source: Dict[str, Tuple[int, ...]],
    *,
    ignored: Callable[[str], bool] = lambda n: False,
    what: str = "checkpoint",
) -> Tuple[Dict[Tuple[str, ...], str], List[str]]:
    """Matches source tensor names/shapes to the Flax params, every tensor exactly once.

    Args:
      name_map: from `tf_name_map` / `diffusers_name_map`.
      source: ``{source name: shape}`` (no data needed).
      ignored: source names that are known not to be weights (reported, not converted).
      what: how to call the source in messages.

    Returns:
      ``({flax path: source name}, [ignored source names])``.

    Raises:
      ConversionError: naming every missing tensor (with the Flax parameter it was for), every
        tensor of the wrong shape (with both shapes), every tensor claimed twice, and every
        source tensor left over.
    """
    chosen, missing, wrong, used = {}, [], [], {}
    for path, tgt in name_map.items():
        present = [n for n in tgt.names if n in source]
        if not present:
            missing.append(f"{' or '.join(tgt.names)} {tgt.shape} (for {'/'.join(path)})")
            continue
        if len(present) > 1:
            wrong.append(
                f"{' and '.join(present)}: both present, one tensor expected (for {'/'.join(path)})"
            )
            continue
        n = present[0]
        if tuple(source[n]) != tgt.shape and tuple(source[n]) not in tgt.alt_shapes:
            wrong.append(
                f"{n}: shape {tuple(source[n])}, expected {tgt.shape} (for {'/'.join(path)})"
            )
            continue
        if n in used:
            wrong.append(f"{n}: claimed by both {'/'.join(used[n])} and {'/'.join(path)}")
            continue
        used[n] = path
        chosen[path] = n
    skipped = sorted(n for n in source if n not in used and ignored(n))
    extra = sorted(n for n in source if n not in used and not ignored(n))
    if missing or wrong or extra:
        lines = [
            f"The {what} does not fit the model ({len(name_map)} parameters expected, "
            f"{len(source)} tensors found):"
        ]
        for title, items in (
            ("missing", missing),
            ("wrong shape / duplicate", wrong),
            ("unexpected (not consumed)", [f"{n} {tuple(source[n])}" for n in extra]),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {s}" for s in items[:40]]
                if len(items) > 40:
                    lines.append(f"    ... and {len(items) - 40} more")
        raise ConversionError("\n".join(lines))
    return chosen, skipped


# ----------------------------------------------------------------------------- config
def _load_config_module(base: str):
    if base.endswith(".py") or os.sep in base:
        if not os.path.isfile(base):
            raise FileNotFoundError(f"--base {base}: no such config file")
        spec = importlib.util.spec_from_file_location("convert_base_config", base)
        mod = importlib.util.module_from_spec(spec)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if root not in sys.path:
            sys.path.insert(0, root)
        spec.loader.exec_module(mod)
        return mod
    if importlib.util.find_spec(f"experiments.{base}") is None:
        raise ConversionError(
            f"--base {base}: there is no experiments/{base}.py; pass one of "
            f"{', '.join(BASES)} or a path to a config .py"
        )
    return importlib.import_module(f"experiments.{base}")


def base_config(base: str):
    """The config of ``experiments/<base>.py`` (a name such as ``'cifar10'``, or a path)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    return _load_config_module(base).get_config()


def _infer_base(
    image_size: Optional[int], levels: Optional[int] = None, source: str = "the weights"
) -> str:
    """The base experiment for a model of ``image_size`` (None: not known) and ``levels`` U-Net
    levels (None: not known): 32 or 4 levels -> cifar10, 256 or 6 -> celebahq256. Otherwise a
    ConversionError naming ``source``, what is known of the model, and ``--base``."""
    if image_size == 32 or levels == 4:
        return "cifar10"
    if image_size == 256 or levels == 6:
        return "celebahq256"
    known = []
    if levels is not None:
        known.append(f"a U-Net with {levels} levels")
    if image_size is not None:
        known.append(f"{image_size}x{image_size} images")
    elif levels is not None:
        known.append("image size not known (TF checkpoints do not store it)")
    raise ConversionError(
        f"{source}: {', '.join(known) or 'the model'}: no base experiment is inferred for it "
        "(only 32x32 or 4 levels -> cifar10, 256x256 or 6 levels -> celebahq256). Pass --base "
        f"NAME (one of {', '.join(BASES)}) or --base path/to/config.py"
    )


#: diffusers UNet2DModel defaults (diffusers 0.42) for fields a config.json may omit.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    time_embedding_dim=None,
    freq_shift=0,
    flip_sin_to_cos=True,
    mid_block_type="UNetMidBlock2D",
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=1,
    downsample_type="conv",
    upsample_type="conv",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=8,
    norm_num_groups=32,
    attn_norm_num_groups=None,
    norm_eps=1e-5,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
)


def config_from_diffusers(
    dcfg: dict, base: Optional[str] = None, *, source: str = "the diffusers config.json"
):
    """Our config for a diffusers ``UNet2DModel`` ``config.json`` (dict).

    Model fields (ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv, image size,
    channels) come from ``dcfg``; the rest from the base experiment. Raises ConversionError
    listing every field our U-Net cannot reproduce. ``source`` names the file in messages.
    """
    from diffusion.models.layers import GN_EPSILON, NUM_GROUPS

    cls = dcfg.get("_class_name", "UNet2DModel")
    c = {**_DIFFUSERS_DEFAULTS, **dcfg}
    problems = []
    if cls != "UNet2DModel":
        problems.append(f"_class_name={cls!r}: only UNet2DModel is supported")
    boc = [int(b) for b in c.get("block_out_channels", ())]
    downs, ups = list(c.get("down_block_types", ())), list(c.get("up_block_types", ()))
    size = c.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            problems.append(f"sample_size={size}: only square images are supported")
        size = size[0]
    if not boc or len(downs) != len(boc) or len(ups) != len(boc):
        problems.append(
            f"block_out_channels={boc}, down_block_types={downs}, "
            f"up_block_types={ups}: need one of each per level"
        )
    want = dict(
        center_input_sample=False,
        time_embedding_type="positional",
        time_embedding_dim=None,
        freq_shift=1,
        flip_sin_to_cos=False,
        mid_block_type="UNetMidBlock2D",
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=NUM_GROUPS,
        resnet_time_scale_shift="default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=None,
    )
    for k, v in want.items():
        if c.get(k) != v:
            problems.append(f"{k}={c.get(k)!r}: our U-Net has {v!r}")
    if c.get("attn_norm_num_groups") not in (None, NUM_GROUPS):
        problems.append(f"attn_norm_num_groups={c['attn_norm_num_groups']!r}: ours is {NUM_GROUPS}")
    if not np.isclose(float(c["norm_eps"]), GN_EPSILON, rtol=1e-3, atol=0):
        problems.append(f"norm_eps={c['norm_eps']!r}: our GroupNorm has eps {GN_EPSILON}")
    if c["downsample_type"] not in ("conv",) or c["upsample_type"] not in ("conv",):
        problems.append(
            f"downsample_type={c['downsample_type']!r}, upsample_type="
            f"{c['upsample_type']!r}: only 'conv' resampling is supported"
        )
    if c["downsample_padding"] != 0:
        problems.append(
            f"downsample_padding={c['downsample_padding']!r}: our stride-2 conv pads "
            "TF 'SAME' (0 before, 1 after) = diffusers downsample_padding 0"
        )
    attn_levels = []
    for lvl, (d, u) in enumerate(zip(downs, reversed(ups))):
        d_attn, u_attn = d == "AttnDownBlock2D", u == "AttnUpBlock2D"
        if d not in ("DownBlock2D", "AttnDownBlock2D"):
            problems.append(f"down_block_types[{lvl}]={d!r}: only DownBlock2D/AttnDownBlock2D")
        if u not in ("UpBlock2D", "AttnUpBlock2D"):
            problems.append(
                f"up_block_types[{len(ups) - 1 - lvl}]={u!r}: only UpBlock2D/AttnUpBlock2D"
            )
        if d_attn != u_attn:
            problems.append(
                f"level {lvl}: attention on the way down ({d}) but not up ({u}) or "
                "vice versa; our U-Net has it on both or neither"
            )
        if d_attn:
            attn_levels.append(lvl)
    hd = c["attention_head_dim"]
    for lvl in attn_levels + ([len(boc) - 1] if boc else []):
        if hd is not None and boc and int(hd) != boc[lvl]:
            problems.append(
                f"attention_head_dim={hd}: {boc[lvl] // int(hd)} heads at "
                f"{boc[lvl]} channels; our attention has one head (use None)"
            )
            break
    ch = boc[0] if boc else 0
    if boc and any(b % ch for b in boc):
        problems.append(f"block_out_channels={boc} are not multiples of the first ({ch})")
    if size is None:
        problems.append("sample_size is missing: the image size is needed")
    if problems:
        raise ConversionError(
            "The diffusers config.json does not describe our U-Net:\n  - " + "\n  - ".join(problems)
        )
    size = int(size)
    config = base_config(base or _infer_base(size, source=source))
    m = config.model
    m.ch = ch
    m.ch_mult = tuple(b // ch for b in boc)
    m.num_res_blocks = int(c["layers_per_block"])
    m.attn_resolutions = tuple(size // 2**lvl for lvl in attn_levels)
    m.resamp_with_conv = True
    config.data.image_size = size
    config.data.channels = int(c["in_channels"])
    _set_out_channels(config, int(c["out_channels"]))
    return config


def _set_out_channels(config, out_ch: int) -> None:
    from diffusion import gaussian

    if gaussian.model_output_channels(config.diffusion.var_type, config.data.channels) == out_ch:
        return
    c = config.data.channels
    if out_ch == 2 * c:
        config.diffusion.var_type = "learned_range"
        logging.warning(
            "%d output channels = 2 x %d: set diffusion.var_type='learned_range' "
            "(check that the model was trained with it)",
            out_ch,
            c,
        )
        return
    raise ConversionError(
        f"{out_ch} output channels do not fit {c} data channels with "
        f"var_type={config.diffusion.var_type!r}"
    )


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


# ----------------------------------------------------------------------------- loading
def abstract_params(config):
    """Shapes of the Flax param tree of ``config`` (``jax.eval_shape``, no weights)."""
    import jax
    import jax.numpy as jnp

    from diffusion.factories import create_model

    model = create_model(config)
    s, c = config.data.image_size, config.data.channels
    return jax.eval_shape(
        lambda: model.init(
            {"params": jax.random.key(0)},
            jnp.zeros((1, s, s, c), jnp.float32),
            jnp.zeros((1,), jnp.int32),
            train=False,
        )
    )["params"]


def _to_f32(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ConversionError(f"{name}: dtype {a.dtype} is not a float")
    return a.astype(np.float32)


def _build(name_map, chosen, get: Callable[[str], np.ndarray]):
    out = {}
    for path, n in chosen.items():
        a = name_map[path].transform(_to_f32(get(n), n))
        out[path] = np.ascontiguousarray(a, dtype=np.float32)
    return _unflat(out)


def _read_safetensors(p: str) -> Dict[str, np.ndarray]:
    """``{name: array}`` of the safetensors file ``p`` (read through `diffusion.io`, so local or
    ``gs://``). Raises ConversionError naming ``p`` when it is truncated or corrupt."""
    from safetensors.numpy import load

    data = io.read_bytes(p)
    try:
        return load(data)
    except Exception as e:  # safetensors' SafetensorError (not exported under a stable name)
        raise ConversionError(
            f"{p} is truncated or corrupt ({len(data):,} bytes; {type(e).__name__}: "
            f"{' '.join(str(e).split())}): download it again (or re-export it with diffusers' "
            "save_pretrained)"
        ) from None


def load_diffusers(folder: str, base: Optional[str] = None):
    """``(config, params, ema_params, step, report)`` from a diffusers model folder.

    The one set of weights is used for both params and ema_params; step 0.
    """
    cfg_path = io.join(folder, DIFFUSERS_CONFIG)
    w_path = io.join(folder, DIFFUSERS_WEIGHTS)
    for p in (cfg_path, w_path):
        if not io.isfile(p):
            raise FileNotFoundError(
                f"{p} not found: a diffusers model folder holds "
                f"{DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS}"
            )
    try:
        dcfg = io.read_json(cfg_path)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise ConversionError(
            f"{cfg_path} is not valid JSON ({type(e).__name__}: {e}): the file is truncated "
            "or corrupt; download it again"
        ) from None
    config = config_from_diffusers(dcfg, base, source=cfg_path)
    _apply_scheduler_config(config, folder)
    tensors = _read_safetensors(w_path)
    name_map = diffusers_name_map(abstract_params(config))
    chosen, _ = match_tensors(
        name_map, {k: v.shape for k, v in tensors.items()}, what=f"diffusers file {w_path}"
    )
    params = _build(name_map, chosen, tensors.__getitem__)
    report = {
        "source": "diffusers",
        "input": io.absolute(folder),
        "tensors": len(tensors),
        "ema": "the file holds one set of weights: used as both params and ema_params",
        "step": 0,
        "dtypes": sorted({str(v.dtype) for v in tensors.values()}),
    }
    return config, params, params, 0, report


def _apply_scheduler_config(config, folder: str) -> None:
    """Checks/sets the diffusion process from a diffusers ``scheduler_config.json`` if present
    (in the folder or its ``scheduler/`` sibling)."""
    for p in (
        io.join(folder, "scheduler_config.json"),
        io.join(
            os.path.dirname(io.absolute(folder).rstrip("/")), "scheduler", "scheduler_config.json"
        ),
    ):
        if io.isfile(p):
            s = io.read_json(p)
            break
    else:
        return
    d = config.diffusion
    if "num_train_timesteps" in s:
        d.num_timesteps = int(s["num_train_timesteps"])
    if s.get("beta_schedule") in ("linear",):
        d.beta_schedule = "linear"
        d.beta_start = float(s.get("beta_start", d.beta_start))
        d.beta_end = float(s.get("beta_end", d.beta_end))
    elif "beta_schedule" in s:
        logging.warning(
            "scheduler beta_schedule=%r kept as the base config's %r",
            s["beta_schedule"],
            d.beta_schedule,
        )
    vt = {
        "fixed_large": "fixedlarge",
        "fixed_small": "fixedsmall",
        "fixed_small_log": "fixedsmall",
    }.get(s.get("variance_type"))
    if vt:
        d.var_type = vt
    if s.get("prediction_type", "epsilon") != "epsilon":
        raise ConversionError(f"{p}: prediction_type={s['prediction_type']!r}; only 'epsilon'")


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


def _detect_source(path: str) -> str:
    if io.isdir(path) and io.isfile(io.join(path, DIFFUSERS_WEIGHTS)):
        return "diffusers"
    return "tf"


def convert(
    input_path: str, workdir: str, *, source: str = "auto", base: Optional[str] = None, **tf_kwargs
) -> dict:
    """Converts ``input_path`` into ``workdir`` (local or ``gs://...``); returns the report dict
    (also written to ``<workdir>/convert_report.json``).

    ``workdir`` is checked first (`diffusion.io.probe_writable`: a missing bucket or missing
    permissions is a `diffusion.io.StorageError` naming the fix, before any weight is read).
    """
    io.probe_writable(workdir, what="--workdir")
    source = _detect_source(input_path) if source == "auto" else source
    if source == "diffusers":
        if tf_kwargs.get("image_size") is not None:
            raise ValueError("--image_size is for TF checkpoints (diffusers has sample_size)")
        config, params, ema, step, report = load_diffusers(input_path, base)
    elif source == "tf":
        config, params, ema, step, report = load_tf(input_path, base, **tf_kwargs)
    else:
        raise ValueError(f"source={source!r}: use 'tf', 'diffusers' or 'auto'")
    n = sum(int(np.prod(a.shape)) for a in _flat(params).values())
    report.update(
        num_params=n,
        model={
            k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.to_dict().items()
        },
        image_size=config.data.image_size,
        dataset=config.data.dataset,
        workdir=io.absolute(workdir),
    )
    report["checkpoint_dir"] = write_workdir(workdir, config, params, ema, step, report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (``python -m diffusion.convert --help``); returns the exit status.

    0: converted. 2: the input or the workdir is wrong (missing, truncated or corrupt files,
    weights that do not fit, an existing or unwritable workdir): ``error: ...`` on stderr
    naming the file and the fix. 1: any other error, as one line ``error: <type>: <text>``
    (``--traceback`` re-raises it instead).
    """
    p = argparse.ArgumentParser(
        prog="python -m diffusion.convert",
        description="Convert released DDPM weights (the authors' TF1 checkpoints or the diffusers "
        "format) into a workdir checkpoint for launch.py --mode sample/evaluate.",
    )
    p.add_argument(
        "--input",
        required=True,
        help="TF: checkpoint prefix (model.ckpt-790000) or its folder; diffusers: the "
        "folder with config.json + diffusion_pytorch_model.safetensors",
    )
    p.add_argument("--workdir", required=True, help="new workdir to write")
    p.add_argument("--source", default="auto", choices=["auto", "tf", "diffusers"])
    p.add_argument(
        "--base",
        default=None,
        help=f"base experiment ({', '.join(BASES)}) or a config .py; default from the "
        "image size (32: cifar10, 256: celebahq256)",
    )
    p.add_argument("--scope", default=None, help="TF: variable scope of the model (auto: 'model')")
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="TF: image size (default: the base experiment's)",
    )
    p.add_argument(
        "--allow-missing-ema",
        action="store_true",
        help="TF: without EMA variables, use the raw weights for ema_params too",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        help="TF: regex of checkpoint variables not to convert (repeatable)",
    )
    p.add_argument(
        "--traceback",
        action="store_true",
        help="on an unexpected error, show the traceback instead of the one-line message",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # quiet Orbax's INFO
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    kw = {}
    if a.source != "diffusers" and _detect_source(a.input) == "tf":
        kw = dict(
            scope=a.scope,
            image_size=a.image_size,
            allow_missing_ema=a.allow_missing_ema,
            ignore=a.ignore,
        )
    try:
        report = convert(a.input, a.workdir, source=a.source, base=a.base, **kw)
    except (ConversionError, FileNotFoundError, FileExistsError, io.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else: one line, not a traceback (unless asked for)
        if a.traceback:
            raise
        print(
            f"error: {type(e).__name__}: {' '.join(str(e).split())} (rerun with --traceback "
            "to see where)",
            file=sys.stderr,
        )
        return 1
    print(
        f"Converted {report['num_params']:,} parameters ({report['source']}, step "
        f"{report['step']}; {report['ema']}) into {report['checkpoint_dir']}"
    )
    if report.get("not_converted"):
        print(
            f"Not converted (optimizer/bookkeeping): {len(report['not_converted'])} variables, "
            "listed in convert_report.json"
        )
    wd = report["workdir"]
    cfg = f"{wd}/config.py"
    if io.is_remote(wd):  # launch.py --config loads a local file
        cfg = "config.py"
        print(
            f"Config:   gcloud storage cp {wd}/config.py {cfg}   (launch.py --config takes a "
            "local file; the copy reads config.json from the workdir)"
        )
    print(f"Sample:   python launch.py --config {cfg} --workdir {wd} --mode sample")
    print(f"Evaluate: python launch.py --config {cfg} --workdir {wd} --mode evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
