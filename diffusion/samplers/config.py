"""``config.sample`` -> `SamplerSpec`, the training grid's partial spec, and the validation of
both (every problem as a one-line message naming the field and the fix).

``config.sample``: ``method``, ``num_steps`` (0 = the full T-step chain), ``eta`` (DDIM's η),
``clip_denoised``, and per method its own options in ``config.sample.<method>`` (e.g.
``config.sample.heun.rho``). It is the sampler of ``--mode sample``, ``--mode evaluate`` and the
training grid; ``config.training.grid_sample`` overrides any of ``method`` / ``num_steps`` /
``eta`` / ``clip_denoised`` for the grid (None: inherit ``config.sample``'s).
"""

from __future__ import annotations

import ast
from typing import Any, Dict, List, Mapping, Tuple

from diffusion.samplers.base import SAMPLERS, SamplerSpec

__all__ = [
    "REMOVED_FIELDS",
    "spec_from_config",
    "grid_spec_from_config",
    "config_problems",
    "migrate_saved_config",
    "parse_spec",
]

# Fields that existed before the sampler spec: config path -> the field that replaces it. The
# configs keep them as None placeholders so that a command line or config file still naming
# them gets a one-line error (`config_problems`) rather than an AttributeError.
REMOVED_FIELDS = {
    "eval.sample_steps": "sample.num_steps",
    "training.grid_sample_steps": "training.grid_sample.num_steps",
}
SPEC_FIELDS = ("method", "num_steps", "eta", "clip_denoised")


def _get(config: Any, path: str, default: Any = None) -> Any:
    node = config
    for part in path.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part)
    return default if node is None else node


def _options(method: str, sample: Any) -> Tuple[Tuple[str, Any], ...]:
    sampler = SAMPLERS.get(method)
    if sampler is None:
        return ()
    merged: Dict[str, Any] = dict(sampler.options)
    section = sample.get(method) if sample is not None and hasattr(sample, "get") else None
    if section is not None and hasattr(section, "items"):
        merged.update(dict(section.items()))
    return tuple(sorted(merged.items()))


def spec_from_config(config: Any, **overrides: Any) -> SamplerSpec:
    """The `SamplerSpec` of ``config.sample``; keyword ``overrides`` (``method``, ``num_steps``,
    ``eta``, ``clip_denoised``) replace its fields for a use that needs another value. The
    method's options come from ``config.sample.<method>`` over the sampler's defaults."""
    s = config.get("sample")
    vals = {
        "method": _get(s, "method", "ancestral"),
        "num_steps": _get(s, "num_steps", 0),
        "eta": _get(s, "eta", 0.0),
        "clip_denoised": _get(s, "clip_denoised", True),
    }
    unknown = set(overrides) - set(SPEC_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampler spec fields {sorted(unknown)}; allowed: {SPEC_FIELDS}")
    vals.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerSpec(
        method=vals["method"],
        num_steps=vals["num_steps"],
        eta=vals["eta"],
        clip_denoised=vals["clip_denoised"],
        options=_options(vals["method"], s),
    )


def _grid_overrides(config: Any) -> Dict[str, Any]:
    g = _get(config, "training.grid_sample")
    if g is None or not hasattr(g, "get"):
        return {}
    return {f: g.get(f) for f in SPEC_FIELDS if g.get(f) is not None}


def grid_spec_from_config(config: Any) -> SamplerSpec:
    """The training grid's spec: ``config.sample`` with the set fields of
    ``config.training.grid_sample`` (a partial spec) in place of its own. The ancestral sampler
    with ``var_type='learned'`` draws the grid with the full T-step chain (``num_steps = 0``):
    a learned log σ² belongs to the one-step kernel and does not respace."""
    spec = spec_from_config(config, **_grid_overrides(config))
    if spec.method == "ancestral" and _get(config, "diffusion.var_type") == "learned":
        spec = spec_from_config(config, **dict(_grid_overrides(config), num_steps=0))
    return spec


def _spec_problems(spec: SamplerSpec, config: Any, where: Mapping[str, str]) -> List[str]:
    p: List[str] = []
    T = _get(config, "diffusion.num_timesteps")
    sampler = SAMPLERS.get(spec.method)
    if sampler is None:
        p.append(
            f"{where['method']}={spec.method!r} is not a registered sampler; choose one of "
            f"{sorted(SAMPLERS)}"
        )
    k = spec.num_steps
    k_ok = isinstance(k, int) and not isinstance(k, bool) and k >= 0
    if not k_ok or (isinstance(T, int) and k > T):
        p.append(
            f"{where['num_steps']}={k!r} is out of range; allowed: 0 (the full T-step chain) "
            f"or 1..{T} steps"
        )
    eta = spec.eta
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
        p.append(
            f"{where['eta']}={eta!r} is out of range; allowed: a number >= 0 (DDIM's η: "
            "0 deterministic, 1 the ancestral step's variance)"
        )
    elif eta != 0 and sampler is not None and not sampler.uses_eta:
        p.append(
            f"{where['eta']}={eta!r} has no effect with {where['method']}={spec.method!r} "
            "(η is DDIM's); set it to 0"
        )
    if not isinstance(spec.clip_denoised, bool):
        p.append(f"{where['clip_denoised']}={spec.clip_denoised!r} must be True or False")
    if sampler is not None:
        section = _get(config, f"sample.{spec.method}")
        if section is not None and hasattr(section, "keys"):
            for name in sorted(set(section.keys()) - set(sampler.options)):
                p.append(
                    f"config.sample.{spec.method}.{name} is not an option of {spec.method!r}; "
                    f"its options: {sorted(sampler.options)}"
                )
        if k_ok and not p:
            p.extend(sampler.problems(spec, config, where))
    return p


def config_problems(config: Any) -> List[str]:
    """Problems with ``config.sample``, the training grid's spec and the removed fields, as
    one-line messages naming the field and the fix; empty when valid."""
    p: List[str] = []
    for old, new in REMOVED_FIELDS.items():
        if _get(config, old) is not None:
            p.append(
                f"config.{old} was removed; set config.{new} instead "
                "(0 = the full T-step chain; see config.sample)"
            )
    if config.get("sample") is None:
        return p
    main = {f: f"config.sample.{f}" for f in SPEC_FIELDS}
    p.extend(_spec_problems(spec_from_config(config), config, main))
    overrides = _grid_overrides(config)
    if _get(config, "training.grid_sample") is not None:
        where = {
            f: (f"config.training.grid_sample.{f}" if f in overrides else main[f])
            for f in SPEC_FIELDS
        }
        p.extend(m for m in _spec_problems(grid_spec_from_config(config), config, where))
    return list(dict.fromkeys(p))


def migrate_saved_config(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A config dict saved by an older version (a workdir's ``config.json``) in today's fields:
    ``eval.sample_steps`` -> ``sample.num_steps``, ``training.grid_sample_steps`` ->
    ``training.grid_sample.num_steps``, and ``eval.clip_denoised`` (which then also governed
    the samplers) -> ``sample.clip_denoised`` when ``sample`` has none. A copy; today's dicts
    come back unchanged."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in saved.items()}
    ev, tr = out.get("eval") or {}, out.get("training") or {}
    sample = out.setdefault("sample", {})
    if "sample_steps" in ev:
        steps = ev.pop("sample_steps")
        if steps is not None:
            sample.setdefault("num_steps", steps)
        if "clip_denoised" in ev:
            sample.setdefault("clip_denoised", ev["clip_denoised"])
    if "grid_sample_steps" in tr:
        steps = tr.pop("grid_sample_steps")
        if steps is not None:
            tr.setdefault("grid_sample", {}).setdefault("num_steps", steps)
    return out


def parse_spec(text: str, config: Any) -> SamplerSpec:
    """A spec from a short string ``METHOD[:NUM_STEPS][:name=value]...`` (benchmarks and
    scripts), e.g. ``ancestral:50``, ``ddim:20:eta=0.5``, ``dpmpp_2m:10:grid=time``,
    ``heun:6:rho=5``: ``config.sample`` with the method, step count, spec fields (``eta``,
    ``clip_denoised``) and method options given. Values are Python literals (else strings)."""
    parts = [x for x in str(text).split(":") if x]
    if not parts:
        raise ValueError(f"empty sampler spec {text!r}; expected METHOD[:NUM_STEPS][:name=value]")
    fields: Dict[str, Any] = {"method": parts[0]}
    options: Dict[str, Any] = {}
    for part in parts[1:]:
        if "=" not in part:
            fields["num_steps"] = int(part)
            continue
        name, raw = part.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        (fields if name in SPEC_FIELDS else options)[name] = value
    spec = spec_from_config(config, **fields)
    if options:
        sampler = SAMPLERS.get(spec.method)
        unknown = sorted(set(options) - set(sampler.options if sampler else ()))
        if unknown:
            raise ValueError(
                f"sampler spec {text!r}: {unknown} are not options of {spec.method!r}; "
                f"its options: {sorted(sampler.options) if sampler else []}"
            )
        merged = dict(spec.options, **options)
        spec = SamplerSpec(
            spec.method, spec.num_steps, spec.eta, spec.clip_denoised, tuple(sorted(merged.items()))
        )
    return spec
