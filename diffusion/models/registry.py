"""The model registry: ``MODELS``, ``register_model`` and ``get_model`` (see the package
docstring). Model modules import this module, never the package, so that the package can import
them to register without an import cycle."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, TypeVar

import jax.numpy as jnp

T = TypeVar("T")

#: name -> model class (a Flax ``nn.Module`` dataclass) or factory ``(**fields) -> nn.Module``.
MODELS: Dict[str, Callable[..., Any]] = {}

#: Allowed string values of ``config.model.dtype`` / ``param_dtype``.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def get_model(config_model: Any, *, out_ch: int) -> Any:
    """Builds the network named by ``config_model.name``.

    Args:
      config_model: ``ml_collections.ConfigDict`` or mapping with fields ``name`` (e.g.
        ``'ddpm_unet'``), ``ch``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``dropout``,
        and optionally ``resamp_with_conv`` (default True), ``dtype`` / ``param_dtype``
        (``'float32'`` | ``'bfloat16'``, default float32), ``remat`` (default False), ``remat_resolutions``
        (default None: `diffusion.models.unet.auto_remat_resolutions`),
        ``conv_impl`` (``diffusion.models.conv.IMPLS``, default ``'auto'``).
      out_ch: output channels; set by the trainer from the data channels and the variance type
        (``C``, or ``2C`` for learned variances).

    Returns:
      An unbound Flax module (apply with ``model.apply(variables, x, t, train=..., rngs=...)``).

    Raises:
      ValueError: unknown ``name`` (the registered names are listed), unknown fields, bad dtype,
        bad ``conv_impl`` (the allowed values are listed).
    """
    fields = _to_dict(config_model)
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ValueError(
            f"config.model.name={name!r} is not a registered model; registered: {sorted(MODELS)}"
        )
    builder = MODELS[name]
    for key in ("dtype", "param_dtype"):
        if key in fields:
            fields[key] = _dtype(key, fields[key])
    if "conv_impl" in fields:
        from diffusion.models.conv import check_conv_impl  # pylint: disable=g-import-not-at-top

        check_conv_impl(fields["conv_impl"])
    for key in ("ch_mult", "attn_resolutions", "remat_resolutions"):
        if key in fields and isinstance(fields[key], (list, tuple)):
            fields[key] = tuple(int(v) for v in fields[key])
    if dataclasses.is_dataclass(builder):
        allowed = {f.name for f in dataclasses.fields(builder) if f.init} - {"parent", "name"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise ValueError(
                f"config.model has fields {unknown} unknown to model {name!r}; "
                f"allowed: {sorted(allowed - {'out_ch'})}"
            )
    return builder(**fields, out_ch=out_ch)
