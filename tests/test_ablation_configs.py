"""Table 2 as configs: every row at paper scale keeps the paper's CIFAR10 settings and builds
the right model; every row at the offline scale validates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import factories
from diffusion.config_check import config_problems
from experiments import ablation, cifar10

PAPER_TABLE2 = {  # paper Table 2 (docs/reference.md): (mean, objective, Σ)
    "xprev_L_learned": ("xprev", "kl", "learned"),
    "xprev_L_fixed": ("xprev", "kl", "fixedlarge"),
    "xprev_mse": ("xprev", "mse", "fixedlarge"),
    "eps_L_learned": ("eps", "kl", "learned"),
    "eps_L_fixed": ("eps", "kl", "fixedlarge"),
    "eps_simple": ("eps", "mse", "fixedlarge"),
}


def _num_params(config):
    model = factories.create_model(config)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32), train=False
        )
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("row", sorted(ablation.ROWS))
def test_paper_scale_rows_keep_the_paper_settings(row):
    c = ablation.get_config(f"row={row}")
    ref = cifar10.get_config()
    for group in ("model", "training", "data"):
        want = ref[group].to_dict()
        if group == "training":  # a row's own training option (eps_L_fixed_is: the t sampler)
            want.update(ablation.ROW_TRAINING.get(row, {}))
        assert c[group].to_dict() == want, group
    assert (c.training.t_sampler == "importance") == row.endswith("_is")
    assert config_problems(c, num_devices=1, process_count=1) == []
    learned = c.diffusion.var_type in ("learned", "learned_range")
    assert _num_params(c) == (35_749_766 if learned else 35_746_307)
    if row in PAPER_TABLE2:
        assert (c.diffusion.mean_type, c.diffusion.loss_type, c.diffusion.var_type) == PAPER_TABLE2[
            row
        ]
        assert c.diffusion.beta_schedule == "linear"


@pytest.mark.parametrize("row", sorted(ablation.ROWS))
def test_offline_rows_validate(row):
    c = ablation.get_config(f"row={row},scale=offline")
    assert c.data.dataset == "mnist5k"
    assert config_problems(c, num_devices=1, process_count=1) == []


def test_six_paper_rows_and_bad_arguments():
    assert set(ablation.PAPER_ROWS) == set(PAPER_TABLE2)
    assert ablation.get_config("eps_simple").diffusion.loss_type == "mse"
    with pytest.raises(ValueError, match="valid rows"):
        ablation.get_config("row=eps_smple")
    with pytest.raises(ValueError, match="valid: \\['paper', 'offline'\\]"):
        ablation.get_config("row=eps_simple,scale=huge")
    with pytest.raises(ValueError, match="needs a row"):
        ablation.get_config()
