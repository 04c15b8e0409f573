"""The model registry: ``MODELS``, ``register_model`` and ``get_model`` (see the package
docstring). Model modules import this module, never the package, so that the package can import
them to register without an import cycle."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, TypeVar

import jax.numpy as jnp

T = TypeVar("T")

#: name -> model class (a Flax ``nn.Module`` dataclass) or factory ``(**fields) -> nn.Module``.
MODELS: Dict[str, Callable[..., Any]] = {}

#: Allowed string values of ``config.model.dtype`` / ``param_dtype``.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

#: Compute choices that moved from ``config.model`` to ``config.runtime``, each with the default
#: it had there. ``config.model`` keeps them as None placeholders so that naming one gets a
#: one-line error (`moved_field_problems`); a saved config (an old workdir's config.json) that
#: still holds the old default is accepted, since ``config.runtime``'s default is the same.
MOVED_TO_RUNTIME: Dict[str, Any] = {"conv_impl": "auto", "remat": False, "remat_resolutions": None}


def register_model(name: str) -> Callable[[T], T]:
    """Class/function decorator adding a model to ``MODELS`` under ``name``.

    Raises ``ValueError`` if ``name`` is already taken by a different object.
    """

    def decorator(cls: T) -> T:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {MODELS[name]!r}")
        MODELS[name] = cls  # type: ignore[assignment]
        return cls

    return decorator


def _to_dict(config_model: Any) -> Dict[str, Any]:
    if hasattr(config_model, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(config_model.to_dict())
    if isinstance(config_model, Mapping):
        return dict(config_model)
    raise TypeError(f"config.model must be a ConfigDict or a mapping, got {type(config_model)}")


def _dtype(field: str, value: Any) -> Any:
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"config.model.{field}={value!r} is not one of {sorted(DTYPES)}")
        return DTYPES[value]
    return value


def moved_field_problems(config_model: Any) -> List[str]:
    """One line per field of ``config_model`` that moved to ``config.runtime``
    (`MOVED_TO_RUNTIME`) and holds a value other than None or its old default."""
    fields = _to_dict(config_model)
    return [
        f"config.model.{k}={fields[k]!r}: {k} moved to config.runtime; set "
        f"--config.runtime.{k}={fields[k]!r} instead (and leave config.model.{k} unset)"
        for k, old in MOVED_TO_RUNTIME.items()
        if fields.get(k) is not None and fields.get(k) != old
    ]


def _accepted(builder: Callable[..., Any]) -> Optional[set]:
    """The keyword arguments ``builder`` takes (None: any, it has ``**kwargs``)."""
    if dataclasses.is_dataclass(builder):
        return {f.name for f in dataclasses.fields(builder) if f.init} - {"parent", "name"}
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def get_model(config_model: Any, *, out_ch: int, runtime: Any = None) -> Any:
    """Builds the network named by ``config_model.name``.

    Args:
      config_model: ``ml_collections.ConfigDict`` or mapping with fields ``name`` (e.g.
        ``'ddpm_unet'``) and the model's own fields (the U-Net: ``ch``, ``ch_mult``,
        ``num_res_blocks``, ``attn_resolutions``, ``dropout``, and optionally
        ``resamp_with_conv`` (default True), ``dtype`` / ``param_dtype`` (``'float32'`` |
        ``'bfloat16'``, default float32)).
      out_ch: output channels; set by the trainer from the data channels and the variance type
        (``C``, or ``2C`` for learned variances).
      runtime: ``config.runtime`` (or a mapping; None: the model's defaults): host compute
        choices (``conv_impl``, ``remat``, ``remat_resolutions``; docs/performance.md). Each is
        given to the model only if the model declares it (the U-Net does), so a new model is a
        plain module with its own fields.

    Returns:
      An unbound Flax module (apply with ``model.apply(variables, x, t, train=..., rngs=...)``).

    Raises:
      ValueError: unknown ``name`` (the registered names are listed), unknown fields, bad dtype,
        a field that moved to ``config.runtime`` (`moved_field_problems`).
    """
    moved = moved_field_problems(config_model)
    if moved:
        raise ValueError(moved[0])
    fields = {k: v for k, v in _to_dict(config_model).items() if k not in MOVED_TO_RUNTIME}
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a registered model; registered: {sorted(MODELS)}"
        )
    builder = MODELS[name]
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = _dtype(key, fields[key])
    accepted = _accepted(builder)
    if runtime is not None:
        for key, value in _to_dict(runtime).items():
            if value is not None and (accepted is None or key in accepted):
                fields[key] = value
    for key in ("ch_mult", "attn_resolutions", "remat_resolutions"):
        if key in fields and isinstance(fields[key], (list, tuple)):
            fields[key] = tuple(int(v) for v in fields[key])
    if accepted is not None and dataclasses.is_dataclass(builder):
        unknown = sorted(set(fields) - accepted)
        if unknown:
            raise ValueError(
                f"config.model has fields {unknown} unknown to model {name!r}; "
                f"allowed: {sorted(accepted - {'out_ch'} - set(MOVED_TO_RUNTIME))}"
            )
    return builder(**fields, out_ch=out_ch)
