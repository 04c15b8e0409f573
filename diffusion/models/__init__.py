"""Model registry: build a network from the ``config.model`` block.

``get_model(config.model, out_ch=..., runtime=config.runtime)`` reads ``name`` and looks it up in
``MODELS``; models register themselves with ``@register_model('name')`` (from
`diffusion.models.registry`). A model is a plain module with its own fields: the host compute
choices of ``config.runtime`` (``conv_impl``, ``remat``, ``remat_resolutions``) reach only the
models that declare them. The DDPM
U-Net is ``'ddpm_unet'`` (:class:`diffusion.models.unet.UNet`).
"""

# Import the model modules so that they register themselves.
from diffusion.models import unet as _unet  # noqa: E402,F401  pylint: disable=g-import-not-at-top
from diffusion.models.registry import DTYPES, MODELS, get_model, register_model  # noqa: F401

__all__ = ["MODELS", "DTYPES", "get_model", "register_model"]
