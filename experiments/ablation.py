"""Table 2 of the paper (and a few rows beyond it) as one config with an argument.

    python launch.py --config experiments/ablation.py:row=eps_simple --workdir gs://B/abl/eps_simple
    python launch.py --config experiments/ablation.py:row=eps_L_fixed,scale=offline --workdir workdirs/abl

``row`` picks the parameterisation / objective / variance; ``scale`` is ``paper`` (the CIFAR10
model and settings of experiments/cifar10.py, 800k steps) or ``offline`` (`offline_config`: the
5,000 offline MNIST digits of experiments/mnist5k.py at 16×16, a 1.1M-parameter U-Net, a fixed
budget of 1,500 steps, evaluated with the paper's full 1000-step chain; about 9 min per row on
2 CPU cores). ``experiments/reproduce.py`` runs and evaluates rows at the offline scale.
A bare row name (``ablation.py:eps_simple``) means the paper scale.

Paper rows (Ho et al. 2020, Table 2, CIFAR10 IS / FID):
  xprev_L_learned   μ̃ prediction, true bound L, learned diagonal Σ      7.28 / 23.69
  xprev_L_fixed     μ̃ prediction, L, fixed isotropic Σ                  8.06 / 13.22
  xprev_mse         μ̃ prediction, ‖μ̃ − μ̃θ‖², fixed Σ                   unstable
  eps_L_learned     ε prediction, L, learned diagonal Σ                 unstable
  eps_L_fixed       ε prediction, L, fixed isotropic Σ                  7.67 / 13.51
  eps_simple        ε prediction, L_simple, fixed Σ (the paper's model) 9.46 / 3.17
Beyond the paper: xstart_simple (x0 prediction), v_simple (v prediction), cosine_eps_simple
(Improved DDPM's cosine schedule), hybrid_learned_range (Improved DDPM's L_hybrid with a
learned-range Σ), eps_L_fixed_is (eps_L_fixed with t importance-sampled as in Improved DDPM
Sec. 3.3: ``training.t_sampler='importance'``, the test of their explanation that L trains
poorly because its gradient is noisy). "Fixed isotropic Σ" is σ² = β_t (``fixedlarge``), the
released code's default.
"""

from experiments import cifar10, mnist5k

# row -> (mean_type, loss_type, var_type, beta_schedule)
ROWS = {
    "xprev_L_learned": ("xprev", "kl", "learned", "linear"),
    "xprev_L_fixed": ("xprev", "kl", "fixedlarge", "linear"),
    "xprev_mse": ("xprev", "mse", "fixedlarge", "linear"),
    "eps_L_learned": ("eps", "kl", "learned", "linear"),
    "eps_L_fixed": ("eps", "kl", "fixedlarge", "linear"),
    "eps_simple": ("eps", "mse", "fixedlarge", "linear"),
    "xstart_simple": ("xstart", "mse", "fixedlarge", "linear"),
    "v_simple": ("v", "mse", "fixedlarge", "linear"),
    "cosine_eps_simple": ("eps", "mse", "fixedlarge", "cosine"),
    "hybrid_learned_range": ("eps", "hybrid", "learned_range", "linear"),
    "eps_L_fixed_is": ("eps", "kl", "fixedlarge", "linear"),
}
# Rows that differ from another in a training option, not in (mean, loss, var, schedule).
ROW_TRAINING = {"eps_L_fixed_is": {"t_sampler": "importance"}}
PAPER_ROWS = (
    "xprev_L_learned",
    "xprev_L_fixed",
    "xprev_mse",
    "eps_L_learned",
    "eps_L_fixed",
    "eps_simple",
)
SCALES = ("paper", "offline")


def parse_arg(arg):
    """``'row=NAME[,scale=paper|offline]'`` or ``'NAME'`` -> (row, scale); ValueError naming the
    valid rows and scales otherwise."""
    if not arg:
        raise ValueError(
            f"experiments/ablation.py needs a row: ablation.py:row=NAME with NAME in {sorted(ROWS)}"
        )
    fields = {}
    for part in arg.split(","):
        key, _, value = part.partition("=")
        if not value:
            key, value = "row", key
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"row", "scale"}
    if unknown:
        raise ValueError(
            f"unknown ablation argument(s) {sorted(unknown)}; use row=NAME,scale=paper|offline"
        )
    row, scale = fields.get("row"), fields.get("scale", "paper")
    if row not in ROWS:
        raise ValueError(f"unknown ablation row {row!r}; valid rows: {sorted(ROWS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown ablation scale {scale!r}; valid: {list(SCALES)}")
    return row, scale


OFFLINE_TRAIN_STEPS = 1500


def offline_config():
    """The offline scale shared by every row: experiments/mnist5k.py shrunk to fit 2 CPU cores.

    16×16×1 digits (the stored 32×32 padded MNIST area-resized), U-Net ch 32, ch_mult (1, 2, 2),
    one res block, attention at 8×8 (1,112,801 params with fixed Σ), batch 32, lr 1e-3, EMA 0.995,
    1,500 steps (≈4.5 min at ≈5.8 steps/s here). Evaluation: FID/KID of N = 128 samples from the
    full T = 1000 ancestral chain (as in the paper; no respacing, so the learned-Σ rows are
    sampled the same way as the fixed ones) against 1,000 training digits, and the full bound in
    bits/dim on 32 test digits.
    """
    config = mnist5k.get_config()
    config.data.image_size = 16
    config.model.ch_mult = (1, 2, 2)
    config.model.attn_resolutions = (8,)
    t = config.training
    t.num_train_steps = OFFLINE_TRAIN_STEPS
    t.warmup_steps = 100
    t.checkpoint_every = 500
    t.keep_every = OFFLINE_TRAIN_STEPS
    t.sample_every = OFFLINE_TRAIN_STEPS
    t.grid_sample.num_steps = 100
    t.num_grid_samples = 16  # learned-Σ rows draw the grid with the full 1000-step chain
    e = config.eval
    e.num_samples = 128
    e.batch_size = 128
    config.sample.num_steps = 0
    e.fid_split = "train[:1000]"
    e.bpd_num_examples = 32
    e.bpd_timesteps = 0  # the full bound
    e.real_floor_split = "auto"
    return config


def get_config(arg=None):
    row, scale = parse_arg(arg)
    config = cifar10.get_config() if scale == "paper" else offline_config()
    mean_type, loss_type, var_type, schedule = ROWS[row]
    config.diffusion.mean_type = mean_type
    config.diffusion.loss_type = loss_type
    config.diffusion.var_type = var_type
    config.diffusion.beta_schedule = schedule
    for field, value in ROW_TRAINING.get(row, {}).items():
        config.training[field] = value
    return config
