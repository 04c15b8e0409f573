"""diffusers ``UNet2DModel`` folders (``--source diffusers``): name map, config.json checks,
safetensors reading (no torch)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

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

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"

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


def _layout(c: dict) -> Tuple[List[int], list, list, Any, List[str]]:
    """``(block_out_channels, down_block_types, up_block_types, image size, problems)`` of a
    diffusers config ``c`` (defaults filled in): the class, a square size, one block per level."""
    problems = []
    cls = c.get("_class_name", "UNet2DModel")
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
    return boc, downs, ups, size, problems


def _fixed_field_problems(c: dict) -> List[str]:
    """The fields of ``c`` that must equal what our U-Net computes (embedding, activation,
    GroupNorm groups and eps, conv resampling with TF 'SAME' padding, no class embedding)."""
    from diffusion.models.layers import GN_EPSILON, NUM_GROUPS

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
    problems = [f"{k}={c.get(k)!r}: our U-Net has {v!r}" for k, v in want.items() if c.get(k) != v]
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
    return problems


def _attention_levels(downs: list, ups: list) -> Tuple[List[int], List[str]]:
    """``(levels with attention, problems)``: each level's down and up block types must be
    plain or attention blocks, with attention on both sides or neither."""
    attn_levels, problems = [], []
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
    return attn_levels, problems


def _width_problems(c: dict, boc: List[int], attn_levels: List[int], size) -> List[str]:
    """Single-head attention at every attention level and the middle, widths multiples of the
    first, and a known image size."""
    problems = []
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
    return problems


def config_from_diffusers(
    dcfg: dict, base: Optional[str] = None, *, source: str = "the diffusers config.json"
):
    """Our config for a diffusers ``UNet2DModel`` ``config.json`` (dict).

    Model fields (ch, ch_mult, num_res_blocks, attn_resolutions, resamp_with_conv, image size,
    channels) come from ``dcfg``; the rest from the base experiment. Raises ConversionError
    listing every field our U-Net cannot reproduce. ``source`` names the file in messages.
    """
    c = {**_DIFFUSERS_DEFAULTS, **dcfg}
    boc, downs, ups, size, problems = _layout(c)
    problems += _fixed_field_problems(c)
    attn_levels, level_problems = _attention_levels(downs, ups)
    problems += level_problems + _width_problems(c, boc, attn_levels, size)
    if problems:
        raise ConversionError(
            "The diffusers config.json does not describe our U-Net:\n  - " + "\n  - ".join(problems)
        )
    size, ch = int(size), boc[0]
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
