"""What the network predicts and how it is trained, validated once into a typed, hashable spec.

Configs hold strings (``config.diffusion.mean_type = 'eps'``); `Parameterization.from_config`
checks them, and the combination, once at start-up and returns a frozen dataclass of
string-valued enum members. A member *is* its string (``MeanType.EPS == 'eps'``), so the maths
functions (`gaussian`, `losses`, `sampling`, `likelihood`) accept either form and need no second
check; the spec is hashable, so it can be a static argument of ``jax.jit``.

- mean (paper Sec. 3.2): ``eps`` (ε-prediction, Eq. 11), ``xstart`` (x_0), ``xprev`` (μ̃, the
  posterior mean), ``v`` (Salimans & Ho 2022).
- var (Sec. 3.2): ``fixedlarge`` (σ_t² = β_t), ``fixedsmall`` (σ_t² = β̃_t, Eq. 7), ``learned``
  (log σ_t² output), ``learned_range`` (Improved DDPM's interpolation of log β_t and log β̃_t).
- loss (Sec. 3.4): ``mse`` (L_simple, Eq. 14), ``kl`` (the true bound L, Eq. 5), ``hybrid``
  (Improved DDPM: L_simple + λ L_vb, the vb term training the variance only).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Dict

from diffusion import gaussian, losses

__all__ = ["MeanType", "VarType", "LossType", "Parameterization"]


class _StrEnum(str, enum.Enum):
    """A str whose enum members format as their value (``enum.StrEnum`` needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class MeanType(_StrEnum):
    EPS = "eps"
    XSTART = "xstart"
    XPREV = "xprev"
    V = "v"


class VarType(_StrEnum):
    FIXEDLARGE = "fixedlarge"
    FIXEDSMALL = "fixedsmall"
    LEARNED = "learned"
    LEARNED_RANGE = "learned_range"

    @property
    def is_learned(self) -> bool:
        return self in (VarType.LEARNED, VarType.LEARNED_RANGE)


class LossType(_StrEnum):
    MSE = "mse"
    KL = "kl"
    HYBRID = "hybrid"


assert set(MeanType) == set(gaussian.MEAN_TYPES) and set(VarType) == set(gaussian.VAR_TYPES)
assert set(LossType) == set(losses.LOSS_TYPES)


@dataclasses.dataclass(frozen=True)
class Parameterization:
    """A valid (mean, var, loss) combination and the hybrid loss weight λ."""

    mean: MeanType = MeanType.EPS
    var: VarType = VarType.FIXEDLARGE
    loss: LossType = LossType.MSE
    hybrid_lambda: float = 0.001

    def __post_init__(self):
        for field, cls in (("mean", MeanType), ("var", VarType), ("loss", LossType)):
            value = getattr(self, field)
            try:
                object.__setattr__(self, field, cls(value))
            except ValueError:
                raise ValueError(
                    f"Unknown {field}_type {value!r}; valid: {[m.value for m in cls]}"
                ) from None
        losses.check_loss_config(self.mean.value, self.var.value, self.loss.value)

    @classmethod
    def from_config(cls, diffusion_config: Any) -> "Parameterization":
        """From ``config.diffusion`` (``mean_type``, ``var_type``, ``loss_type``,
        ``hybrid_lambda``); raises ValueError naming a bad value or combination."""
        d = diffusion_config
        return cls(
            mean=d.mean_type,
            var=d.var_type,
            loss=d.loss_type,
            hybrid_lambda=float(d.get("hybrid_lambda", 0.001)),
        )

    @property
    def model_kwargs(self) -> Dict[str, Any]:
        """``mean_type`` / ``var_type`` keywords of the maths functions (samplers, bound)."""
        return {"mean_type": self.mean, "var_type": self.var}

    @property
    def loss_kwargs(self) -> Dict[str, Any]:
        """Keywords of `losses.training_losses` / `losses.loss_from_output`."""
        return {
            "mean_type": self.mean,
            "var_type": self.var,
            "loss_type": self.loss,
            "hybrid_lambda": self.hybrid_lambda,
        }

    def output_channels(self, image_channels: int) -> int:
        """Network output channels: 2C for a learned variance (mean ‖ variance), else C."""
        return 2 * image_channels if self.var.is_learned else image_channels
