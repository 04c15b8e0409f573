"""LSUN Cat 256x256 (paper Appendix B, Table 3 FID 19.75): the 256x256 model
(113,673,219 params), lr 2e-5, batch 64, dropout 0, EMA 0.9999, eps / fixedlarge / mse.
Flips as in the paper (Appendix B): on for every data set except LSUN Bedroom. TFDS `lsun/cat` must be prepared in
--config.data.data_dir (it is not downloaded at run time).

    python launch.py --config experiments/lsun_cat.py --workdir gs://BUCKET/ddpm/lsun_cat
"""
from experiments import celebahq256


def get_config():
    config = celebahq256.get_config()
    config.data.dataset = "lsun/cat"
    config.data.random_flip = True
    config.training.num_train_steps = 1_800_000
    return config
