"""LSUN Bedroom 256x256 (paper Appendix B, Table 3 FID 6.36 (large model 4.90)): the 256x256 model
(113,673,219 params), lr 2e-5, batch 64, dropout 0, EMA 0.9999, eps / fixedlarge / mse.
Flips as in the paper (Appendix B): on for every data set except LSUN Bedroom. TFDS `lsun/bedroom` must be prepared in
--config.data.data_dir (it is not downloaded at run time).

    python launch.py --config experiments/lsun_bedroom.py --workdir gs://BUCKET/ddpm/lsun_bedroom
"""
from experiments import celebahq256


def get_config():
    config = celebahq256.get_config()
    config.data.dataset = "lsun/bedroom"
    config.data.random_flip = False   # the paper trained Bedroom without flips
    config.training.num_train_steps = 2_400_000
    return config
