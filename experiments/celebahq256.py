"""CelebA-HQ 256x256 (paper Appendix B): 113,673,219 parameters, ch_mult (1,1,2,2,4,4), dropout 0,
lr 2e-5, batch 64, EMA 0.9999, random flips, eps / fixedsmall / mse, 0.5M steps.
σ²_t = β̃_t (`fixedsmall`): the released CelebA-HQ and LSUN code samples with the posterior
variance (diffusion_utils.py has no other), while its CIFAR10 code uses β_t (`fixedlarge`).
Needs TFDS `celeb_a_hq/256` prepared by hand (manual download) in --config.data.data_dir.

    python launch.py --config experiments/celebahq256.py --workdir gs://BUCKET/ddpm/celebahq256
"""

from experiments import default


def get_config():
    config = default.get_config()
    config.data.dataset = "celeb_a_hq/256"
    config.data.image_size = 256
    config.data.in_memory = False  # 30k images x 196,608 bytes: stream with tf.data
    config.data.random_flip = True
    config.diffusion.var_type = "fixedsmall"  # as the released 256x256 code samples
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.dropout = 0.0
    config.runtime.remat = False
    config.training.lr = 2e-5
    config.training.batch_size = 64
    config.training.num_train_steps = 500_000
    config.eval.batch_size = 64
    return config
