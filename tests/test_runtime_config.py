"""``config.runtime``: the host compute choices (``conv_impl``, ``remat``, ``remat_resolutions``)
live outside the model contract. A new model is a plain module (no ``**unused``); the old
``config.model.<field>`` gives a one-line error naming the new field, while a saved config that
still holds the old default (an old workdir's config.json) is accepted and resumes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from diffusion.config_check import config_problems, incompatible_fields
from diffusion.models import MODELS, get_model, register_model
from diffusion.models.unet import UNet
from experiments import default

TINY = dict(name="ddpm_unet", ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))


@pytest.fixture
def plain_models():
    """Registers two plain models (a module and a factory function), unregistered afterwards."""

    @register_model("test_plain_module")
    class Plain(nn.Module):
        ch: int
        out_ch: int

        @nn.compact
        def __call__(self, x, t, *, train):
            return nn.Conv(self.out_ch, (1, 1))(nn.Conv(self.ch, (1, 1))(x))

    def plain_factory(ch, out_ch):
        return Plain(ch=ch, out_ch=out_ch)

    register_model("test_plain_factory")(plain_factory)
    yield Plain
    MODELS.pop("test_plain_module")
    MODELS.pop("test_plain_factory")


def test_a_plain_model_builds_from_the_default_config(plain_models):
    config = default.get_config()
    for name in ("test_plain_module", "test_plain_factory"):
        model = get_model(
            {"name": name, "ch": 8, **{k: None for k in ("conv_impl", "remat")}},
            out_ch=3,
            runtime=config.runtime,  # conv_impl='auto', remat=False: not the plain model's
        )
        assert isinstance(model, plain_models) and (model.ch, model.out_ch) == (8, 3)
        y = model.apply(
            model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)), None, train=False),
            jnp.ones((1, 4, 4, 3)),
            None,
            train=False,
        )
        assert y.shape == (1, 4, 4, 3)


def test_the_unet_takes_its_compute_choices_from_runtime():
    model = get_model(
        TINY,
        out_ch=3,
        runtime={"conv_impl": "xla", "remat": True, "remat_resolutions": [8]},
    )
    assert isinstance(model, UNet)
    assert (model.conv_impl, model.remat, model.remat_resolutions) == ("xla", True, (8,))
    model = get_model(TINY, out_ch=3)  # no runtime: the model's defaults
    assert (model.conv_impl, model.remat, model.remat_resolutions) == ("auto", False, None)


@pytest.mark.parametrize(
    "field, value", [("conv_impl", "xla"), ("remat", True), ("remat_resolutions", (32,))]
)
def test_the_old_model_field_is_a_one_line_error_naming_the_new_one(field, value):
    config = default.get_config()
    config.model[field] = value
    problems = [p for p in config_problems(config) if field in p]
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert f"config.runtime.{field}" in problems[0]
    with pytest.raises(
        ValueError, match=rf"moved to config.runtime; set --config.runtime.{field}="
    ):
        get_model({**TINY, field: value}, out_ch=3)


def test_a_saved_config_with_the_old_defaults_still_validates_and_resumes():
    # What a workdir written before config.runtime existed holds (and its converted config.py
    # merges back into config.model): the old defaults under model.
    saved = default.get_config().to_dict()
    saved.pop("runtime")
    saved["model"].update(conv_impl="auto", remat=False, remat_resolutions=None)
    config = default.get_config()
    assert incompatible_fields(saved, config) == []
    config.model.update(dict(conv_impl="auto", remat=False))  # as the merged config.py does
    assert config_problems(config) == []
    model = get_model(config.model, out_ch=3, runtime=config.runtime)
    assert model.conv_impl == "auto" and model.remat is False


def test_runtime_values_are_validated():
    config = default.get_config()
    config.runtime.conv_impl = "fast"
    problems = config_problems(config)
    assert any("config.runtime.conv_impl='fast'" in p for p in problems), problems
