"""Speed and memory benchmarks of the DDPM code, with a PyTorch/diffusers peer side by side.

Entry point: ``python -m benchmarks.run`` (or ``make bench``); see `benchmarks.run`. The older
stand-alone scripts (``python benchmarks/unet_forward.py`` etc.) still run as files.
"""
