"""Every configuration field, with the paper's CIFAR10 values as defaults.

Other configs start from this one and override. Run any config with
    python launch.py --config experiments/default.py --workdir /tmp/ddpm_default
and override any field: --config.training.batch_size=64 --config.diffusion.loss_type=kl
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    # The forward process and the objective (docs/reference.md, "The process, losses and decoder").
    config.diffusion = d = ml_collections.ConfigDict()
    d.beta_schedule = "linear"  # linear | quad | const | jsd | warmup10 | warmup50 | cosine
    d.beta_start = 1e-4
    d.beta_end = 0.02
    d.num_timesteps = 1000
    d.mean_type = "eps"  # eps | xstart | xprev | v
    d.var_type = "fixedlarge"  # fixedlarge | fixedsmall | learned | learned_range
    d.loss_type = "mse"  # mse (L_simple) | kl (true bound L) | hybrid (Improved DDPM)
    d.hybrid_lambda = 0.001

    # The U-Net (docs/reference.md, "The U-Net"); name selects a registered model.
    config.model = m = ml_collections.ConfigDict()
    m.name = "ddpm_unet"
    m.ch = 128
    m.ch_mult = (1, 2, 2, 2)
    m.num_res_blocks = 2
    m.attn_resolutions = (16,)
    m.dropout = 0.1
    m.resamp_with_conv = True
    m.dtype = "float32"  # compute dtype: float32 | bfloat16 (params stay float32)
    # moved to config.runtime (naming them here is a one-line error):
    m.conv_impl = ml_collections.config_dict.placeholder(str)
    m.remat = ml_collections.config_dict.placeholder(bool)
    m.remat_resolutions = ml_collections.config_dict.placeholder(tuple)

    # How this host computes the model: pure compute choices, the same parameters and (to float
    # rounding) the same results; every knob and variable is in docs/performance.md.
    config.runtime = r = ml_collections.ConfigDict()
    r.conv_impl = "auto"  # auto | xla | winograd | winograd4 | mixed (3x3 conv compute)
    r.remat = False  # rematerialise each block (memory for 256x256)
    # ResBlocks recomputed in the backward pass, by feature-map height, e.g. (32,); unset: on CPU
    # (float32) the heights >= 32, elsewhere none (diffusion.models.unet.auto_remat_resolutions)
    r.remat_resolutions = ml_collections.config_dict.placeholder(tuple)

    # Optimisation, EMA, logging and checkpoint cadence (docs/reference.md, "Training hyperparameters").
    config.training = t = ml_collections.ConfigDict()
    t.batch_size = 128  # global batch over all devices and processes
    t.num_train_steps = 800_000
    t.lr = 2e-4
    t.warmup_steps = 5000
    t.grad_clip = 1.0
    t.grad_clip_groups = 0  # 0/1: clip the mean gradient; N: clip each of N equal groups
    # of the batch, then average (released TPU code: N = cores, 8)
    t.adam_b1 = 0.9
    t.adam_b2 = 0.999
    t.adam_eps = 1e-8
    t.weight_decay = 0.0
    t.ema_decay = 0.9999
    t.log_every = 100
    t.checkpoint_every = 5000  # rolling checkpoint to resume from
    t.keep_every = 50_000  # permanent checkpoints (evaluation sweeps)
    t.sample_every = 50_000  # EMA sample grid (PNG + TensorBoard)
    t.num_grid_samples = 64
    # The grid's sampler: config.sample with these fields replaced (None: config.sample's own).
    t.grid_sample = gs = ml_collections.ConfigDict()
    gs.method = ml_collections.config_dict.placeholder(str)
    gs.num_steps = 100  # a 100-step chain for the grid (the full chain is for eval)
    gs.eta = ml_collections.config_dict.placeholder(float)
    gs.clip_denoised = True  # as the released code's sample summaries
    t.grid_sample_steps = ml_collections.config_dict.placeholder(int)  # removed: grid_sample
    t.nonfinite = "raise"  # raise | skip: what a non-finite loss/gradient does
    # How t is drawn: uniform (Algorithm 1) | importance (Improved DDPM Sec. 3.3: p_t ∝
    # sqrt(E[L_t²]) over the last t_sampler_history terms of each t, mixed with uniform_prob of
    # the uniform draw, weights 1/(T p_t); meant for loss_type=kl; diffusion/training/t_sampler.py)
    t.t_sampler = "uniform"
    t.t_sampler_history = 10
    t.t_sampler_uniform_prob = 0.001
    t.tensorboard = True  # TensorBoard event files (through TensorFlow's file system)
    t.resume = "full"  # full | params: params = take params/EMA/step from the
    # checkpoint into a new optimizer state (explicit opt-in)
    t.save_timeout_s = 300.0  # longest one asynchronous checkpoint save may run before the
    # run stops with an error naming the step (a hung file system or bucket); raise it for
    # very large checkpoints on slow storage

    # The sampler of --mode sample, --mode evaluate, the training grid (training.grid_sample
    # overrides fields) and experiments/reproduce.py (diffusion/samplers/, docs/extending.md).
    config.sample = s = ml_collections.ConfigDict()
    s.method = "ancestral"  # ancestral | ddim | dpmpp_2m | dpmpp_2m_sde | heun
    s.num_steps = 0  # 0: the full T-step chain; K: K steps (heun: K grid points, 2K-1 calls)
    s.eta = 0.0  # DDIM's eta: 0 deterministic, 1 the ancestral fixedsmall step
    s.clip_denoised = True  # clip x0-hat to [-1, 1] in every step
    # Each method's own options (used only when it is the method):
    s.dpmpp_2m = ml_collections.ConfigDict({"grid": "logsnr", "fractional_t": True})
    s.dpmpp_2m_sde = ml_collections.ConfigDict({"grid": "logsnr", "fractional_t": True})
    s.heun = ml_collections.ConfigDict({"rho": 7.0, "fractional_t": True})
    # grid: logsnr (uniform in log-SNR) | time (uniform in t); fractional_t: feed the network
    # the fractional t of each grid point (False: round the grid to the trained timesteps)

    # Input pipeline.
    config.data = dd = ml_collections.ConfigDict()
    dd.dataset = "cifar10"  # mnist5k | emoji32 | cifar10 | celeb_a_hq/256 | lsun/bedroom ...
    dd.image_size = 32
    dd.channels = 3
    dd.random_flip = True
    dd.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir; None: TFDS default
    dd.in_memory = True  # load the split into RAM: batches are a pure fn of (seed, step)

    # Evaluation (launch.py --mode evaluate).
    config.eval = e = ml_collections.ConfigDict()
    e.num_samples = 50_000
    e.batch_size = 256
    e.sample_steps = ml_collections.config_dict.placeholder(int)  # removed: sample.num_steps
    e.clip_denoised = True  # clip x0-hat to [-1, 1] in the bound's p(x_{t-1}|x_t)
    e.fid_split = "train"  # the paper's Table 1 FID uses training-set statistics;
    # 'train,test': FID against both in one pass (first = primary)
    e.bpd_split = "test"  # 'test,train[:10000]': the bound on both (first = primary)
    e.inception_weights = ml_collections.config_dict.placeholder(str)  # a file with the logits
    # layer (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)
    # for the Inception Score; None: IS not computed
    e.real_floor_split = "auto"  # real images scored like the samples (same N and reference)
    # for the FID floor: auto | '' (skip) | a split like 'test[:512]'
    e.bpd_num_examples = 10_000
    e.bpd_timesteps = 0  # 0: the full bound (T network calls per example); K: an
    # unbiased estimate from K random timesteps, with its s.e.
    e.checkpoints = "latest"  # latest | all (sweep every permanent checkpoint)
    return config
