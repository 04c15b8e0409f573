"""The sampler registry (diffusion/samplers.py) and the typed parameterization spec: each
registered method runs the sampler of `diffusion.sampling` it names with the spec's options
(checked against those functions, whose maths test_sampling.py checks against closed-form
truth), one result type, and the string and enum forms of a parameterization agree."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import samplers
from diffusion import sampling as S
from diffusion.parameterization import LossType, MeanType, Parameterization, VarType
from diffusion.schedules import make_schedule

SCHED = make_schedule("linear", beta_start=1e-3, beta_end=0.2, num_timesteps=100)
SHAPE = (6, 2, 2, 1)
KEY = jax.random.key(3)


def _denoise(x, t):  # a smooth stand-in network: eps-hat = 0.3 x_t + small t-dependence
    return 0.3 * x + 0.001 * t.astype(jnp.float32)[:, None, None, None]


PARAM = Parameterization("eps", "fixedsmall", "mse")


@pytest.mark.parametrize(
    "spec, direct",
    [
        (
            samplers.SamplerSpec("ancestral", 0),
            lambda kw: S.ancestral_sample(SCHED, _denoise, SHAPE, KEY, **kw),
        ),
        (
            samplers.SamplerSpec("ancestral", 10),
            lambda kw: S.respaced_sample(SCHED, _denoise, SHAPE, KEY, num_steps=10, **kw),
        ),
        (
            samplers.SamplerSpec("ddim", 10, eta=0.5),
            lambda kw: S.ddim_sample(SCHED, _denoise, SHAPE, KEY, num_steps=10, eta=0.5, **kw),
        ),
        (
            samplers.SamplerSpec("ddim", 0, eta=0.0, clip_denoised=False),
            lambda kw: S.ddim_sample(
                SCHED, _denoise, SHAPE, KEY, eta=0.0, **dict(kw, clip_denoised=False)
            ),
        ),
    ],
)
def test_each_method_runs_the_sampler_it_names(spec, direct):
    kw = dict(mean_type="eps", var_type="fixedsmall", clip_denoised=True)
    got = samplers.draw(spec, SCHED, _denoise, SHAPE, KEY, PARAM)
    assert isinstance(got, samplers.SampleResult) and got.progressive is None
    np.testing.assert_array_equal(np.asarray(got.x), np.asarray(direct(kw)))


def test_methods_differ_and_progressive_is_part_of_the_one_result_type():
    a = samplers.draw(samplers.SamplerSpec("ancestral", 10), SCHED, _denoise, SHAPE, KEY, PARAM)
    d = samplers.draw(samplers.SamplerSpec("ddim", 10), SCHED, _denoise, SHAPE, KEY, PARAM)
    assert not np.allclose(np.asarray(a.x), np.asarray(d.x))
    p = samplers.draw(
        samplers.SamplerSpec("ancestral", 10),
        SCHED,
        _denoise,
        SHAPE,
        KEY,
        PARAM,
        progressive_every=5,
    )
    assert p.progressive.shape == (2,) + SHAPE
    np.testing.assert_array_equal(np.asarray(p.x), np.asarray(a.x))
    np.testing.assert_array_equal(np.asarray(p.progressive[-1]), np.asarray(p.x))


def test_chain_tags_and_config_problems():
    assert samplers.chain_tag(samplers.SamplerSpec("ancestral", 0), 1000) == "full1000"
    assert samplers.chain_tag(samplers.SamplerSpec("ancestral", 50), 1000) == "respaced50"
    assert samplers.chain_tag(samplers.SamplerSpec("ddim", 50, eta=0.0), 1000) == "ddim50_eta0"
    assert samplers.chain_tag(samplers.SamplerSpec("ddim", 0, eta=1.0), 1000) == "ddim1000_eta1"
    c = ml_collections.ConfigDict({"sample": {"method": "euler", "eta": -1.0}})
    problems = "\n".join(samplers.sampler_problems(c))
    assert "config.sample.method='euler'" in problems and "config.sample.eta=-1.0" in problems
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        samplers.draw(samplers.SamplerSpec("euler"), SCHED, _denoise, SHAPE, KEY, PARAM)
    with pytest.raises(ValueError, match="already registered"):
        samplers.register_sampler("ddim")(lambda *a: None)


def test_parameterization_spec_is_validated_once_hashable_and_equal_to_its_strings():
    p = Parameterization("xstart", "learned_range", "hybrid", hybrid_lambda=0.01)
    assert (
        p.mean is MeanType.XSTART and p.var is VarType.LEARNED_RANGE and p.loss is LossType.HYBRID
    )
    assert (
        p.mean == "xstart"
        and {p: 1}[Parameterization("xstart", "learned_range", "hybrid", hybrid_lambda=0.01)] == 1
    )
    assert p.output_channels(3) == 6 and Parameterization().output_channels(3) == 3
    with pytest.raises(ValueError, match="Unknown mean_type 'epsilon'"):
        Parameterization("epsilon")
    with pytest.raises(ValueError, match="loss_type='mse' with var_type='learned'"):
        Parameterization("eps", "learned", "mse")
    # The maths takes the enum members wherever it takes the strings, with identical results;
    # the spec is a valid static argument of jax.jit.
    by_str = S.ancestral_sample(SCHED, _denoise, SHAPE, KEY, mean_type="eps", var_type="fixedsmall")
    f = jax.jit(
        lambda key, param: (
            samplers.draw(samplers.SamplerSpec(), SCHED, _denoise, SHAPE, key, param).x
        ),
        static_argnums=1,
    )
    np.testing.assert_array_equal(np.asarray(f(KEY, PARAM)), np.asarray(by_str))
