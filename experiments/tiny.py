"""A tiny config for tests: real offline data (mnist5k), a 2-level U-Net with ch 32, T = 100.

python launch.py --config experiments/tiny.py --workdir /tmp/ddpm_tiny
"""

from experiments import mnist5k


def get_config():
    config = mnist5k.get_config()
    config.diffusion.num_timesteps = 100
    config.diffusion.var_type = "fixedlarge"
    config.diffusion.beta_end = 0.2
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.data.image_size = 32
    config.training.batch_size = 8
    config.training.num_train_steps = 20
    config.training.lr = 1e-3
    config.training.warmup_steps = 5
    config.training.log_every = 5
    config.training.checkpoint_every = 10
    config.training.keep_every = 20
    config.training.sample_every = 20
    config.training.num_grid_samples = 4
    config.training.grid_sample.num_steps = 5
    config.eval.num_samples = 16
    config.eval.batch_size = 8
    config.sample.num_steps = 100
    config.eval.fid_split = "train[:1000]"
    config.eval.bpd_num_examples = 8
    config.eval.bpd_timesteps = 0
    return config
