"""LSUN Cat 256x256 (paper Appendix B, Table 3 FID 19.75): the 256x256 model
(113,673,219 params), lr 2e-5, batch 64, dropout 0, EMA 0.9999, eps / fixedsmall (σ² = β̃_t, as the released
scripts sample) / mse.
Flips follow the released training commands (scripts/run_lsun.py of hojonathanho/diffusion): on for
Church and Bedroom, off for Cat (`--randflip 0`). The paper's Appendix B says the opposite for Bedroom
and Cat (flips everywhere except Bedroom); we follow the commands because they are the record of the
runs that produced the released checkpoints. For the paper's text: --config.data.random_flip=False
on Bedroom, =True on Cat. TFDS `lsun/cat` must be prepared in
--config.data.data_dir (it is not downloaded at run time).

    python launch.py --config experiments/lsun_cat.py --workdir gs://BUCKET/ddpm/lsun_cat
"""

from experiments import celebahq256


def get_config():
    config = celebahq256.get_config()
    config.data.dataset = "lsun/cat"
    config.data.random_flip = False
    config.training.num_train_steps = 1_800_000
    return config
