"""CIFAR10 32x32, the paper's exact settings (Ho et al. 2020, Appendix B; released run_cifar.py).

35,746,307 parameters; Adam 2e-4, warm-up 5000, clip 1.0, batch 128, EMA 0.9999, dropout 0.1,
random flips, eps / fixedlarge / mse, 800k steps (10.6 h on a TPU v3-8).
Needs the TFDS `cifar10` data prepared in --config.data.data_dir (no download at run time).

    python launch.py --config experiments/cifar10.py --workdir gs://BUCKET/ddpm/cifar10
"""

from experiments import default


def get_config():
    return default.get_config()
