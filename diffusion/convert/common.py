"""What every source shares: the error type, the base configs, the name-map target
`Target`, tensor matching (`match_tensors`), the abstract parameter tree and building it."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

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


#: Module names of our U-Net parameter tree (both name maps parse them).
_LEVEL = re.compile(r"^(down|up)_(\d+)_(block|attn)_(\d+)$")
_RESAMPLE = re.compile(r"^(down|up)_(\d+)_(downsample|upsample)$")
_MID = re.compile(r"^mid_(block|attn)_(\d+)$")
