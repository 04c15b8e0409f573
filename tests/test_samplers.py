"""The sampler layer (diffusion/samplers/) and the typed parameterization spec: each registered
method runs the sampler it names with the spec's options (ancestral and DDIM checked against
`diffusion.sampling`, whose maths test_sampling.py checks against closed-form truth; the solvers
are checked against closed forms in test_solvers.py), one result type; tags, descriptions, NFE and
config problems per method; the old step-count fields give a one-line error naming the new one;
and the string and enum forms of a parameterization agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import samplers
from diffusion import sampling as S
from diffusion.parameterization import LossType, MeanType, Parameterization, VarType
from diffusion.schedules import make_schedule
from experiments import default, mnist5k

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


def test_tags_descriptions_and_nfe_of_every_method():
    T = 1000
    spec = samplers.SamplerSpec
    # The ancestral and DDIM tags are those of stores written before the registry.
    assert samplers.tag(spec("ancestral", 0), T) == "full1000"
    assert samplers.tag(spec("ancestral", 50), T) == "respaced50"
    assert samplers.tag(spec("ddim", 50, eta=0.0), T) == "ddim50_eta0"
    assert samplers.tag(spec("ddim", 0, eta=1.0), T) == "ddim1000_eta1"
    c = default.get_config()
    for method in ("dpmpp_2m", "dpmpp_2m_sde", "heun"):
        c.sample.method, c.sample.num_steps = method, 10
        s = samplers.spec_from_config(c)
        assert samplers.tag(s, T).startswith(method.split("_")[0])
    c.sample.method = "dpmpp_2m"
    assert samplers.tag(samplers.spec_from_config(c), T) == "dpmpp_2m10_logsnr"
    c.sample.dpmpp_2m.grid, c.sample.dpmpp_2m.fractional_t = "time", False
    assert samplers.tag(samplers.spec_from_config(c), T) == "dpmpp_2m10_time_int"
    c.sample.method = "heun"
    h = samplers.spec_from_config(c)
    assert samplers.tag(h, T) == "heun10_rho7" and samplers.nfe(h, T) == 19
    assert "NFE 19" in samplers.describe(h, T)
    # steps_for_nfe inverts nfe (Heun: 2K - 1 calls for K grid points, the last step Euler).
    for method in samplers.SAMPLERS:
        sampler = samplers.get(method)
        for n in (5, 10, 20, 50, 100):
            k = sampler.steps_for_nfe(n, T)
            assert sampler.nfe(spec(method, k), T) <= n < sampler.nfe(spec(method, k + 1), T) + 1
    tags = {samplers.tag(spec(m, 10), T) for m in samplers.SAMPLERS}
    assert len(tags) == len(samplers.SAMPLERS)  # file names never collide across methods


def test_config_problems_name_the_field_and_the_fix():
    def problems(**sample):
        c = default.get_config()
        for k, v in sample.items():
            c.sample[k] = v
        return "\n".join(samplers.config_problems(c))

    assert problems() == ""
    assert "config.sample.method='euler' is not a registered sampler" in problems(method="euler")
    assert "config.sample.eta=-1.0 is out of range" in problems(method="ddim", eta=-1.0)
    assert "config.sample.eta=0.5 has no effect" in problems(method="heun", eta=0.5)
    assert "config.sample.num_steps=1001 is out of range" in problems(num_steps=1001)
    c = default.get_config()
    c.sample.method = "heun"
    c.sample.heun.rho = -1.0
    assert "config.sample.heun.rho=-1.0" in "\n".join(samplers.config_problems(c))
    c = default.get_config()
    c.sample.method = "dpmpp_2m"
    c.sample.dpmpp_2m.grid = "karras"
    assert "config.sample.dpmpp_2m.grid='karras'" in "\n".join(samplers.config_problems(c))
    c.sample.dpmpp_2m.grid = "logsnr"
    c.diffusion.mean_type = "xprev"
    assert "config.diffusion.mean_type='xprev'" in "\n".join(samplers.config_problems(c))
    # The grid's partial spec: its own fields are named as its own, inherited ones as sample's.
    c = default.get_config()
    c.training.grid_sample.method = "no_such"
    assert "config.training.grid_sample.method='no_such'" in "\n".join(samplers.config_problems(c))
    # The removed fields, set on the command line or by an old config file: one line each,
    # naming the new field.
    c = default.get_config()
    c.eval.sample_steps, c.training.grid_sample_steps = 50, 100
    msgs = samplers.config_problems(c)
    assert any(
        "config.eval.sample_steps was removed; set config.sample.num_steps" in m for m in msgs
    )
    assert any(
        "config.training.grid_sample_steps was removed; set config.training.grid_sample.num_steps"
        in m
        for m in msgs
    )
    assert all("\n" not in m for m in msgs)


def test_grid_spec_is_config_sample_with_the_grid_fields_replaced():
    c = mnist5k.get_config()
    c.sample.method, c.sample.eta = "ddim", 0.5
    g = samplers.grid_spec_from_config(c)
    assert (g.method, g.num_steps, g.eta) == ("ddim", c.training.grid_sample.num_steps, 0.5)
    c.training.grid_sample.method = "heun"
    c.training.grid_sample.eta = 0.0
    c.sample.heun.rho = 5.0
    g = samplers.grid_spec_from_config(c)
    assert (g.method, g.eta, g.option("rho")) == ("heun", 0.0, 5.0)
    # The evaluation spec is untouched by the grid's fields.
    assert samplers.spec_from_config(c).method == "ddim"
    # ancestral + learned variance: the grid uses the full chain (the respaced one cannot).
    c = mnist5k.get_config()
    c.diffusion.var_type, c.diffusion.loss_type = "learned", "hybrid"
    assert samplers.grid_spec_from_config(c).num_steps == 0
    msgs = samplers.config_problems(c)
    assert any("config.sample.num_steps=50: a respaced ancestral chain" in m for m in msgs)
    assert not any("grid_sample" in m for m in msgs)


def test_old_saved_configs_map_to_the_new_fields():
    old = {
        "eval": {"sample_steps": 50, "clip_denoised": False, "num_samples": 8},
        "training": {"grid_sample_steps": 20, "lr": 1e-3},
        "sample": {"method": "ddim", "eta": 0.0},
    }
    new = samplers.migrate_saved_config(old)
    assert new["sample"] == {"method": "ddim", "eta": 0.0, "num_steps": 50, "clip_denoised": False}
    assert new["training"] == {"lr": 1e-3, "grid_sample": {"num_steps": 20}}
    assert "sample_steps" not in new["eval"] and old["eval"]["sample_steps"] == 50  # a copy
    today = {"sample": {"num_steps": 3}, "eval": {"num_samples": 8}}
    assert samplers.migrate_saved_config(today) == today


def test_registry_rejects_unknown_and_duplicate_names():
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        samplers.draw(samplers.SamplerSpec("euler"), SCHED, _denoise, SHAPE, KEY, PARAM)
    with pytest.raises(ValueError, match="already registered"):
        samplers.register(samplers.get("ddim"))


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


def test_short_spec_strings_of_the_benchmarks():
    c = default.get_config()
    s = samplers.parse_spec("heun:6:rho=5", c)
    assert (s.method, s.num_steps, s.option("rho"), s.option("fractional_t")) == (
        "heun",
        6,
        5,
        True,
    )
    s = samplers.parse_spec("ddim:20:eta=0.5:clip_denoised=False", c)
    assert (s.method, s.num_steps, s.eta, s.clip_denoised) == ("ddim", 20, 0.5, False)
    assert samplers.parse_spec("dpmpp_2m:10:grid=time", c).option("grid") == "time"
    assert samplers.parse_spec("ancestral", c) == samplers.spec_from_config(c)
    with pytest.raises(ValueError, match=r"\['rho'\] are not options of 'ddim'"):
        samplers.parse_spec("ddim:5:rho=3", c)
