"""The DDPM U-Net (Ho, Jain & Abbeel 2020, Appendix B; released ``diffusion_tf/models/unet.py``).

A PixelCNN++-style U-Net backbone of Wide-ResNet blocks with GroupNorm, single-head self-attention
at chosen resolutions, and the diffusion timestep fed to every residual block through a sinusoidal
embedding. Parameter names follow the released code (``down_{level}_block_{i}``,
``down_{level}_attn_{i}``, ``down_{level}_downsample``, ``mid_block_1``, ``mid_attn_1``,
``mid_block_2``, ``up_{level}_block_{i}``, ``up_{level}_attn_{i}``, ``up_{level}_upsample``,
``temb``, ``conv_in``, ``norm_out``, ``conv_out``), so the parameter tree is the same with and
without rematerialisation.

Example::

    model = UNet(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                 dropout=0.1, out_ch=3)
    variables = model.init({'params': k0}, x, t, train=False)
    eps = model.apply(variables, x, t, train=True, rngs={'dropout': k1})
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.models.conv import IMPLS as CONV_IMPLS
from diffusion.models.layers import (
    NUM_GROUPS,
    AttnBlock,
    Downsample,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    _conv,
    _group_norm,
    nonlinearity,
)
from diffusion.models.registry import register_model

Dtype = Any


def _as_hw(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    hw = tuple(int(s) for s in image_size)
    if len(hw) != 2:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    return hw  # type: ignore[return-value]


def unet_resolutions(image_size: Union[int, Sequence[int]], ch_mult: Sequence[int]) -> List[int]:
    """Feature-map heights the U-Net passes through, one per level: ``H / 2**level``.

    Args:
      image_size: input height (int, square images) or ``(H, W)``.
      ch_mult: channel multiplier per level.

    Returns:
      ``[H, H/2, ..., H / 2**(len(ch_mult)-1)]`` (integer division).
    """
    h, _ = _as_hw(image_size)
    return [h // 2**i for i in range(len(ch_mult))]


def validate_unet_config(
    image_size: Union[int, Sequence[int]],
    ch: int,
    ch_mult: Sequence[int],
    attn_resolutions: Sequence[int],
    num_groups: int = NUM_GROUPS,
) -> List[str]:
    """Checks a U-Net configuration against an input size before anything is built.

    Problems found (each as one human-readable string naming the config field):
      * ``ch_mult`` empty or with non-positive entries;
      * input height/width not divisible by ``2 ** (len(ch_mult) - 1)`` (every level but the last
        halves the resolution);
      * an entry of ``attn_resolutions`` that never occurs (the resolutions that do occur are listed);
      * ``ch`` or some ``ch * mult`` not divisible by the GroupNorm group count (32).

    Args:
      image_size: input height (int) or ``(H, W)``.
      ch: base channel count.
      ch_mult: channel multiplier per level.
      attn_resolutions: feature-map heights (pixels) at which attention blocks are inserted.
      num_groups: GroupNorm groups (32 in the paper).

    Returns:
      A list of problem strings; empty if the configuration is valid.
    """
    problems: List[str] = []
    try:
        h, w = _as_hw(image_size)
    except (TypeError, ValueError) as e:
        return [str(e)]
    ch_mult = tuple(ch_mult)
    if not ch_mult or any(int(m) <= 0 for m in ch_mult):
        problems.append(
            f"model.ch_mult must be a non-empty sequence of positive ints, got {ch_mult}"
        )
        return problems
    if ch <= 0:
        problems.append(f"model.ch must be positive, got {ch}")
        return problems
    factor = 2 ** (len(ch_mult) - 1)
    if h % factor or w % factor:
        problems.append(
            f"input resolution {h}x{w} is not divisible by 2**(len(ch_mult)-1) = {factor} "
            f"(ch_mult={ch_mult} has {len(ch_mult)} levels, each but the last downsamples by 2)"
        )
    occurring = unet_resolutions(h, ch_mult)
    bad_attn = [r for r in attn_resolutions if r not in occurring]
    if bad_attn:
        problems.append(
            f"model.attn_resolutions {tuple(attn_resolutions)}: resolution(s) {bad_attn} never occur "
            f"for {h}x{w} inputs with ch_mult={ch_mult}; the resolutions that occur are {occurring}"
        )
    widths = sorted({ch} | {ch * int(m) for m in ch_mult})
    bad_ch = [c for c in widths if c % num_groups]
    if bad_ch:
        problems.append(
            f"channel counts {bad_ch} (model.ch={ch} times model.ch_mult={ch_mult}) are not divisible "
            f"by the {num_groups} GroupNorm groups"
        )
    return problems


#: The smallest feature-map height whose ResBlocks ``remat_resolutions=None`` recomputes on CPU
#: (float32): the CIFAR10 U-Net's 32x32 top level (benchmarks/RESULTS.md §24).
REMAT_MIN_HEIGHT = 32


def auto_remat_resolutions(
    image_size: int, dtype: Dtype = jnp.float32, backend: Optional[str] = None
) -> Tuple[int, ...]:
    """The feature-map heights whose ResBlocks ``remat_resolutions=None`` recomputes in the
    backward pass, for a U-Net on ``image_size`` inputs: on the CPU backend with float32 compute
    every height >= 32 among ``image_size, image_size // 2, ...`` (a height below the U-Net's
    last level matches no ResBlock and changes nothing), elsewhere none (nothing was measured
    there). On CPU the train step's peak memory is its activations; the
    top level holds most of them and costs the least to recompute."""
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu" or jnp.dtype(dtype) != jnp.float32:
        return ()
    sizes, s = [], int(image_size)
    while s >= REMAT_MIN_HEIGHT:
        sizes.append(s)
        s //= 2
    return tuple(sizes)


@register_model("ddpm_unet")
class UNet(nn.Module):
    """The DDPM U-Net epsilon/x0/mean predictor (paper Appendix B; released ``models/unet.py``).

    Attributes:
      ch: base channel count (128 in the paper).
      ch_mult: channel multiplier per resolution level, e.g. ``(1, 2, 2, 2)`` for CIFAR10.
      num_res_blocks: ResBlocks per level on the down path (the up path has one more).
      attn_resolutions: feature-map heights in pixels with self-attention, e.g. ``(16,)``.
      out_ch: output channels (``C`` for eps/x0/mean, ``2C`` with learned variances).
      dropout: dropout rate inside ResBlocks. Dropout draws from the RNG stream named
        ``'dropout'``: pass ``rngs={'dropout': key}`` to ``apply`` when ``train=True``.
      resamp_with_conv: use convs in Downsample (stride 2) / Upsample (after nearest x2).
      dtype: compute dtype of convs/dense/attention (``jnp.bfloat16`` for mixed precision);
        GroupNorm statistics and the softmax stay float32, the output is always float32.
      param_dtype: parameter dtype (float32).

    The last three come from ``config.runtime`` (host compute choices; docs/performance.md),
    not ``config.model``: they change neither the parameters nor (to rounding) the results.

      remat: wrap every ResBlock / AttnBlock in ``nn.remat`` (recompute activations in the backward
        pass to save memory; same parameters and same results).
      remat_resolutions: feature-map heights whose ResBlocks are wrapped in ``nn.remat`` (when
        ``remat`` is False). ``None`` (default) chooses `auto_remat_resolutions`: on the CPU
        backend with float32 compute, the heights >= 32 (the CIFAR10 U-Net's top level: 2/3 of
        its activations for 1/4 of its FLOPs; batch 32: XLA's temporaries 2,216 -> 2,034 MiB at
        1.04x the step time, benchmarks/RESULTS.md §24), elsewhere none.
      conv_impl: how the 3x3 stride-1 convs are computed (`diffusion.models.conv`): ``'auto'``
        (per-layer measured choice on CPU with float32 compute, XLA's conv elsewhere), ``'xla'``,
        ``'winograd'`` (F(2x2,3x3)), ``'winograd4'`` (F(4x4,3x3)), ``'mixed'`` (XLA forward,
        Winograd weight gradient). Parameters and results (to fp32 rounding) do not depend on it.

    Call: ``model.apply(variables, x, t, train=bool, rngs={'dropout': key})`` with ``x [B,H,W,C]``
    float (data scaled to [-1, 1]) and ``t [B]`` integer timesteps (code index 0..T-1), returns
    ``[B,H,W,out_ch]`` float32.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    out_ch: int
    dropout: float = 0.0
    resamp_with_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"
    remat_resolutions: Optional[Sequence[int]] = None

    def validate(self, image_size: Union[int, Sequence[int]]) -> None:
        """Raises ``ValueError`` listing every problem of this config for ``image_size`` inputs.

        Callable before ``init`` (no parameters needed). ``image_size``: int or ``(H, W)``.
        """
        problems = validate_unet_config(image_size, self.ch, self.ch_mult, self.attn_resolutions)
        if self.num_res_blocks < 1:
            problems.append(f"model.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.conv_impl, str) or self.conv_impl not in CONV_IMPLS:
            problems.append(
                f"runtime.conv_impl={self.conv_impl!r} is not one of {list(CONV_IMPLS)}"
            )
        if self.remat_resolutions is not None:
            heights = unet_resolutions(image_size, self.ch_mult)
            never = [r for r in self.remat_resolutions if r not in heights]
            if never:
                problems.append(
                    f"runtime.remat_resolutions has {never}, which never occur: the ResBlocks' "
                    f"feature maps are {heights} high (or leave it unset for the default)"
                )
        if problems:
            raise ValueError("Invalid U-Net configuration:\n  - " + "\n  - ".join(problems))

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool) -> jax.Array:
        """Predicts the network output for noisy images ``x`` at timesteps ``t``.

        Args:
          x: ``[B, H, W, C]`` float images.
          t: ``[B]`` integer timesteps.
          train: enables dropout (needs ``rngs={'dropout': key}``).

        Returns:
          ``[B, H, W, out_ch]`` float32.
        """
        if x.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B] = ({x.shape[0]},), got {t.shape}")
        self.validate(x.shape[1:3])

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        remat_res = (
            auto_remat_resolutions(x.shape[1], self.dtype)
            if self.remat_resolutions is None
            else tuple(self.remat_resolutions)
        )
        remat_block = nn.remat(ResBlock, static_argnums=(3,))
        attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock
        attn_res = tuple(self.attn_resolutions)
        num_levels = len(self.ch_mult)

        def res_block(h, out_ch, name):
            res_cls = remat_block if self.remat or h.shape[1] in remat_res else ResBlock
            return res_cls(
                out_ch=out_ch, dropout=self.dropout, conv_impl=self.conv_impl, name=name, **kw
            )(h, temb, train)

        # Timestep embedding.
        temb = TimestepEmbedding(self.ch, name="temb", **kw)(t)

        # Downsampling.
        hs = [_conv(self.ch, name="conv_in", conv_impl=self.conv_impl, **kw)(x)]
        for i_level, mult in enumerate(self.ch_mult):
            for i_block in range(self.num_res_blocks):
                h = res_block(hs[-1], self.ch * mult, f"down_{i_level}_block_{i_block}")
                if h.shape[1] in attn_res:
                    h = attn_cls(name=f"down_{i_level}_attn_{i_block}", **kw)(h)
                hs.append(h)
            if i_level != num_levels - 1:
                hs.append(
                    Downsample(self.resamp_with_conv, name=f"down_{i_level}_downsample", **kw)(
                        hs[-1]
                    )
                )

        # Middle.
        h = hs[-1]
        h = res_block(h, None, "mid_block_1")
        h = attn_cls(name="mid_attn_1", **kw)(h)
        h = res_block(h, None, "mid_block_2")

        # Upsampling.
        for i_level in reversed(range(num_levels)):
            for i_block in range(self.num_res_blocks + 1):
                h = res_block(
                    jnp.concatenate([h, hs.pop()], axis=-1),
                    self.ch * self.ch_mult[i_level],
                    f"up_{i_level}_block_{i_block}",
                )
                if h.shape[1] in attn_res:
                    h = attn_cls(name=f"up_{i_level}_attn_{i_block}", **kw)(h)
            if i_level != 0:
                h = Upsample(
                    self.resamp_with_conv,
                    conv_impl=self.conv_impl,
                    name=f"up_{i_level}_upsample",
                    **kw,
                )(h)
        assert not hs, f"{len(hs)} skip connections left unused"

        # End.
        h = nonlinearity(_group_norm(name="norm_out", **kw)(h))
        h = _conv(self.out_ch, init_scale=0.0, name="conv_out", conv_impl=self.conv_impl, **kw)(h)
        return h.astype(jnp.float32)
