"""Table 2 of the paper (and a few rows beyond it) as one config with an argument.

    python launch.py --config experiments/ablation.py:row=eps_simple --workdir gs://B/abl/eps_simple
    python launch.py --config experiments/ablation.py:row=eps_L_fixed,scale=offline --workdir workdirs/abl

``row`` picks the parameterisation / objective / variance; ``scale`` is ``paper`` (the CIFAR10
model and settings of experiments/cifar10.py, 800k steps) or ``offline`` (experiments/mnist5k.py:
a small U-Net on the 5,000 offline MNIST digits with a fixed step budget, for 2 CPU cores).
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
learned-range Σ). "Fixed isotropic Σ" is σ² = β_t (``fixedlarge``), the released code's default.
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
}
PAPER_ROWS = ("xprev_L_learned", "xprev_L_fixed", "xprev_mse", "eps_L_learned", "eps_L_fixed",
              "eps_simple")
SCALES = ("paper", "offline")


def parse_arg(arg):
    """``'row=NAME[,scale=paper|offline]'`` or ``'NAME'`` -> (row, scale); ValueError naming the
    valid rows and scales otherwise."""
    if not arg:
        raise ValueError(f"experiments/ablation.py needs a row: ablation.py:row=NAME with NAME in "
                         f"{sorted(ROWS)}")
    fields = {}
    for part in arg.split(","):
        key, _, value = part.partition("=")
        if not value:
            key, value = "row", key
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"row", "scale"}
    if unknown:
        raise ValueError(f"unknown ablation argument(s) {sorted(unknown)}; use row=NAME,scale=paper|offline")
    row, scale = fields.get("row"), fields.get("scale", "paper")
    if row not in ROWS:
        raise ValueError(f"unknown ablation row {row!r}; valid rows: {sorted(ROWS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown ablation scale {scale!r}; valid: {list(SCALES)}")
    return row, scale


def get_config(arg=None):
    row, scale = parse_arg(arg)
    config = cifar10.get_config() if scale == "paper" else mnist5k.get_config()
    mean_type, loss_type, var_type, schedule = ROWS[row]
    config.diffusion.mean_type = mean_type
    config.diffusion.loss_type = loss_type
    config.diffusion.var_type = var_type
    config.diffusion.beta_schedule = schedule
    if scale == "offline" and var_type == "learned":
        # The learned log σ² has no meaning on a respaced chain: evaluate with the full chain.
        config.eval.sample_steps = 0
        config.eval.num_samples = 128
    return config
