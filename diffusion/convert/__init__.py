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

One module per job: `common` (error type, base configs, tensor matching, building the tree),
`tf` and `diffusers` (one per source: name map, config, reading), `workdir` (writing the result),
`cli` (`convert` and the command line; ``__main__`` runs it).
"""

from diffusion.convert.cli import convert, main
from diffusion.convert.common import (
    BASES,
    ConversionError,
    Target,
    abstract_params,
    base_config,
    match_tensors,
)
from diffusion.convert.diffusers import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_WEIGHTS,
    config_from_diffusers,
    diffusers_name_map,
    load_diffusers,
)
from diffusion.convert.tf import EMA_SUFFIX, config_from_tf_shapes, load_tf, tf_name_map
from diffusion.convert.workdir import write_workdir

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
    "BASES",
]
