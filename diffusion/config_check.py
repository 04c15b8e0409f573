"""Start-up validation of a run's config: every problem found at once, each naming the field,
the value and what is allowed; and the comparison of a config with the one a workdir was
started with (resuming a different model is refused)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from diffusion import gaussian, losses
from diffusion.schedules import BETA_SCHEDULES

__all__ = ["ConfigError", "config_problems", "validate_config", "incompatible_fields"]

# Fields that change the shapes or the meaning of saved parameters: a resumed run must match them.
SHAPE_FIELDS = (
    "model.name",
    "model.ch",
    "model.ch_mult",
    "model.num_res_blocks",
    "model.attn_resolutions",
    "model.resamp_with_conv",
    "data.image_size",
    "data.channels",
    "diffusion.var_type",
    "diffusion.mean_type",
    "diffusion.num_timesteps",
    "diffusion.beta_schedule",
    "diffusion.beta_start",
    "diffusion.beta_end",
)


# Switches that add or remove an optimizer stage, and so change the saved optimizer state's tree:
# (description, function of the config giving the value compared).
def _t_sampler_state(c) -> tuple:
    """What the timestep sampler keeps in the TrainState: nothing for uniform (also for configs
    saved before the option existed), a [T, history] loss history for importance."""
    try:
        kind = _get(c, "training.t_sampler")
    except (KeyError, AttributeError):
        return ("uniform",)
    if kind != "importance":
        return (kind,)
    return (kind, int(_get(c, "training.t_sampler_history")))


OPTIMIZER_STRUCTURE = (
    (
        "training.grad_clip > 0 (a clipping stage)",
        lambda c: float(_get(c, "training.grad_clip")) > 0,
    ),
    (
        "training.weight_decay > 0 (a weight-decay stage)",
        lambda c: float(_get(c, "training.weight_decay")) > 0,
    ),
    (
        "training.t_sampler / t_sampler_history (importance sampling keeps a loss history per t)",
        _t_sampler_state,
    ),
)


class ConfigError(ValueError):
    """A config has invalid values; the message lists one problem per line."""


def _get(config: Any, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _choice(problems, config, field, allowed):
    value = _get(config, field)
    if value not in allowed:
        problems.append(f"config.{field}={value!r} is not allowed; choose one of {sorted(allowed)}")


def _range(problems, config, field, ok, allowed_text, types=(int, float)):
    value = _get(config, field)
    if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
        problems.append(f"config.{field}={value!r} is out of range; allowed: {allowed_text}")


def config_problems(
    config: Any, *, num_devices: Optional[int] = None, process_count: Optional[int] = None
) -> List[str]:
    """Every problem with ``config`` as a list of one-line messages (empty when valid).

    Checks enumerated fields (schedule, mean/var/loss types, dataset, model name, dtype), ranges
    (lr > 0, 0 ≤ ema < 1, 0 ≤ dropout < 1, positive steps and sizes), the loss/variance combination,
    the U-Net's shape rules against the image size, and that the global batch divides over the
    devices and processes.
    """
    from diffusion.data import KNOWN_DATASETS  # deferred: imports TensorFlow
    from diffusion.models import MODELS
    from diffusion.models.registry import moved_field_problems

    p: List[str] = []
    _choice(p, config, "diffusion.beta_schedule", BETA_SCHEDULES)
    _choice(p, config, "diffusion.mean_type", gaussian.MEAN_TYPES)
    _choice(p, config, "diffusion.var_type", gaussian.VAR_TYPES)
    _choice(p, config, "diffusion.loss_type", losses.LOSS_TYPES)
    _range(p, config, "diffusion.num_timesteps", lambda v: v >= 2, "an integer >= 2", (int,))
    _range(p, config, "diffusion.beta_start", lambda v: 0 < v <= 1, "0 < beta_start <= 1")
    _range(p, config, "diffusion.beta_end", lambda v: 0 < v <= 1, "0 < beta_end <= 1")
    _range(p, config, "diffusion.hybrid_lambda", lambda v: v >= 0, ">= 0")
    if not p:
        try:
            losses.check_loss_config(
                config.diffusion.mean_type, config.diffusion.var_type, config.diffusion.loss_type
            )
        except ValueError as e:
            p.append(f"config.diffusion.loss_type / var_type: {e}")
        if config.diffusion.beta_start > config.diffusion.beta_end:
            p.append(
                f"config.diffusion.beta_start={config.diffusion.beta_start} must be <= "
                f"config.diffusion.beta_end={config.diffusion.beta_end}"
            )
    _choice(p, config, "model.name", MODELS)
    p.extend(moved_field_problems(config.model))
    if config.get("runtime") is not None:
        from diffusion.models.conv import IMPLS

        _choice(p, config, "runtime.conv_impl", IMPLS)
        _choice(p, config, "runtime.remat", (True, False))
    _choice(p, config, "model.dtype", ("float32", "bfloat16"))
    _range(p, config, "model.dropout", lambda v: 0 <= v < 1, "0 <= dropout < 1")
    _range(p, config, "model.ch", lambda v: v > 0, "a positive integer", (int,))
    _range(p, config, "model.num_res_blocks", lambda v: v >= 1, "an integer >= 1", (int,))
    _choice(p, config, "data.dataset", KNOWN_DATASETS)
    _range(p, config, "data.image_size", lambda v: v > 0, "a positive integer", (int,))
    _choice(p, config, "data.channels", (1, 3))
    if config.data.dataset in KNOWN_DATASETS and config.data.channels in (1, 3):
        want = KNOWN_DATASETS[config.data.dataset].channels
        if want != config.data.channels:
            p.append(
                f"config.data.channels={config.data.channels} but dataset "
                f"{config.data.dataset!r} has {want} channel(s); set --config.data.channels={want}"
            )
    shape_bad = any(f in x for x in p for f in ("model.ch=", "model.name", "data.image_size"))
    if config.model.name == "ddpm_unet" and not shape_bad:
        from diffusion.models.unet import validate_unet_config

        for msg in validate_unet_config(
            config.data.image_size,
            config.model.ch,
            tuple(config.model.ch_mult),
            tuple(config.model.attn_resolutions),
        ):
            p.append(f"config.model / config.data.image_size: {msg}")
    t = "training."
    _range(p, config, t + "lr", lambda v: v > 0, "lr > 0")
    _range(p, config, t + "ema_decay", lambda v: 0 <= v < 1, "0 <= ema_decay < 1")
    _range(p, config, t + "grad_clip", lambda v: v >= 0, ">= 0 (0 disables clipping)")
    _range(p, config, t + "adam_eps", lambda v: v > 0, "> 0")
    _range(p, config, t + "adam_b1", lambda v: 0 <= v < 1, "0 <= b1 < 1")
    _range(p, config, t + "adam_b2", lambda v: 0 <= v < 1, "0 <= b2 < 1")
    _range(p, config, t + "weight_decay", lambda v: v >= 0, ">= 0")
    _range(p, config, t + "warmup_steps", lambda v: v >= 0, "an integer >= 0", (int,))
    for f in (
        "batch_size",
        "num_train_steps",
        "log_every",
        "checkpoint_every",
        "keep_every",
        "sample_every",
        "num_grid_samples",
    ):
        _range(p, config, t + f, lambda v: v >= 1, "an integer >= 1", (int,))
    _choice(p, config, t + "nonfinite", ("raise", "skip"))
    if "t_sampler" in config.training:  # absent from configs saved before it existed
        from diffusion.training.t_sampler import T_SAMPLERS

        _choice(p, config, t + "t_sampler", T_SAMPLERS)
        _range(p, config, t + "t_sampler_history", lambda v: v >= 1, "an integer >= 1", (int,))
        _range(
            p, config, t + "t_sampler_uniform_prob", lambda v: 0 < v <= 1, "0 < uniform_prob <= 1"
        )
    _choice(p, config, t + "resume", ("full", "params"))
    _choice(p, config, t + "tensorboard", (True, False))
    if "save_timeout_s" in config.training:  # absent from configs saved before it existed
        _range(p, config, t + "save_timeout_s", lambda v: v > 0, "a number of seconds > 0")
    _range(
        p,
        config,
        t + "grad_clip_groups",
        lambda v: v >= 0,
        "an integer >= 0 (0 or 1: clip the mean gradient; N: clip each of N groups)",
        (int,),
    )
    groups, bs = config.training.grad_clip_groups, config.training.batch_size
    if isinstance(groups, int) and groups > 1 and isinstance(bs, int) and bs % groups:
        p.append(
            f"config.training.grad_clip_groups={groups} must divide config.training.batch_size={bs}"
        )
    bs = config.training.batch_size
    if isinstance(bs, int) and bs >= 1:
        if num_devices and bs % num_devices:
            p.append(
                f"config.training.batch_size={bs} (the global batch) must be divisible by the "
                f"number of devices {num_devices}; use a multiple of {num_devices}"
            )
        if process_count and bs % process_count:
            p.append(
                f"config.training.batch_size={bs} must be divisible by the number of "
                f"processes {process_count}"
            )
    if "eval" in config and not any("diffusion." in x for x in p):
        from diffusion.evaluation.settings import eval_config_problems  # before training starts

        p.extend(
            eval_config_problems(
                config, num_devices=num_devices or 1, process_count=process_count or 1
            )
        )
    return p


def validate_config(config: Any, **kwargs) -> None:
    """Raises `ConfigError` listing every problem found by `config_problems`."""
    problems = config_problems(config, **kwargs)
    if problems:
        raise ConfigError(
            "Invalid config (%d problem%s):\n  - %s"
            % (len(problems), "" if len(problems) == 1 else "s", "\n  - ".join(problems))
        )


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def incompatible_fields(saved: Dict[str, Any], config: Any, *, optimizer: bool = True) -> List[str]:
    """The fields where ``config`` differs from the ``saved`` config dict of a workdir in a way
    that changes the saved tree, each as ``'field: saved -> new'``: the shape-defining fields
    (`SHAPE_FIELDS`) and, with ``optimizer``, the switches that add or remove an optimizer stage
    (`OPTIMIZER_STRUCTURE`: ``grad_clip`` 0 vs > 0, ``weight_decay`` 0 vs > 0)."""
    diffs = []
    for f in SHAPE_FIELDS:
        try:
            old = _get(saved, f)
        except (KeyError, AttributeError):
            continue
        new = _get(config, f)
        if _norm(old) != _norm(new):
            diffs.append(f"{f}: {old!r} (saved) -> {new!r} (now)")
    if optimizer:
        for what, fn in OPTIMIZER_STRUCTURE:
            try:
                old = fn(saved)
            except (KeyError, AttributeError, TypeError, ValueError):
                continue
            new = fn(config)
            if old != new:
                diffs.append(f"{what}: {old} (saved) -> {new} (now)")
    return diffs
