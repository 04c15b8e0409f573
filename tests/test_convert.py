"""Tests of diffusion/convert.py: released weights -> workdir checkpoint. Offline, no torch.

Independent truth:
* ``tests/fixtures/diffusers_tiny/``: a small DDPM-shaped diffusers ``UNet2DModel`` with random
  weights in every layer and its outputs on fixed inputs at t = 0, 10, 500, 999, computed by
  diffusers/torch (made once by ``tests/fixtures/make_diffusers_fixture.py``);
* a TF1 checkpoint written here by TensorFlow itself: ``tf.compat.v1`` variables created under
  nested variable scopes by a walk that follows the released ``diffusion_tf/models/unet.py``
  (its own diffusers -> TF correspondence, not the converter's), the EMA shadows created by
  ``tf.train.ExponentialMovingAverage.apply`` and the slots by ``AdamOptimizer.minimize``, saved
  by ``tf.train.Saver``;
* the paper's parameter counts, 35,746,307 (CIFAR10) and 113,673,219 (256x256).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "diffusers_tiny")
REF = os.path.join(FIXTURE, "reference_outputs.npz")
BASE = "emoji32"  # a 32x32x3 offline base config for the fixture (model fields from it)
RTOL = 1e-5


def _tensors():
    from safetensors.numpy import load_file

    return {
        k: v.astype(np.float32)
        for k, v in load_file(os.path.join(FIXTURE, convert.DIFFUSERS_WEIGHTS)).items()
    }


def _rel_err(params, config):
    """max |ours - reference| / max |reference| over the fixture's inputs, per example."""
    import jax.numpy as jnp

    from diffusion.factories import create_model

    ref = np.load(REF)
    out = np.asarray(
        create_model(config).apply(
            {"params": params}, jnp.asarray(ref["x"]), jnp.asarray(ref["t"]), train=False
        )
    )
    eps = ref["eps"]
    return [float(np.abs(out[i] - eps[i]).max() / np.abs(eps[i]).max()) for i in range(len(eps))]


def _restore(workdir):
    """(config, params, ema_params, step) through the evaluator's own restore path."""
    import jax

    from diffusion import evaluate, parallel
    from diffusion.checkpoint import Checkpointer
    from diffusion.factories import create_model

    sys.path.insert(0, workdir)
    try:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "converted_cfg", os.path.join(workdir, "config.py")
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        config = mod.get_config()
    finally:
        sys.path.remove(workdir)
    mesh = parallel.make_mesh()
    model = create_model(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        step = ckpt.latest_step()
        ema = evaluate.restore_ema_params(ckpt, step, config, model, mesh)
        state, _ = ckpt.restore(step, evaluate._abstract_state(config, model, mesh))
    finally:
        ckpt.close()
    return config, jax.device_get(state.params), jax.device_get(ema), int(state.step)


# ------------------------------------------------------------------------------ diffusers
@pytest.mark.slow
def test_diffusers_fixture_cli_roundtrip_without_torch(tmp_path):
    """The CLI converts the fixture (torch made unimportable), and the checkpoint restored by
    the evaluator's own path reproduces diffusers' outputs at every t within 1e-5."""
    wd = str(tmp_path / "wd")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from diffusion import convert\n"
        f"rc = convert.main(['--input', {FIXTURE!r}, '--workdir', {wd!r}, '--base', {BASE!r}])\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules "
        "if sys.modules[m] is not None)\n"
        "sys.exit(rc)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "used as both params and ema_params" in r.stdout
    assert "--mode sample" in r.stdout
    config, params, ema, step = _restore(wd)
    assert step == 0
    assert config.model.ch == 32 and tuple(config.model.ch_mult) == (1, 2)
    assert config.model.num_res_blocks == 1 and tuple(config.model.attn_resolutions) == (16,)
    assert config.data.image_size == 32 and config.data.channels == 3
    errs = _rel_err(ema, config)
    assert max(errs) < RTOL, errs
    import jax

    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema)):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f)["model"]["ch_mult"] == [1, 2]
    with open(os.path.join(wd, "convert_report.json")) as f:
        rep = json.load(f)
    assert rep["source"] == "diffusers" and rep["num_params"] == 702_499


def test_diffusers_deprecated_attention_names(tmp_path):
    """The older files name the attention query/key/value/proj_attn: same result."""
    from safetensors.numpy import save_file

    t = _tensors()
    ren = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for k, v in t.items():
        for a, b in ren.items():
            k = k.replace(a, b)
        old[k] = v
    d = tmp_path / "old"
    d.mkdir()
    save_file(old, str(d / convert.DIFFUSERS_WEIGHTS))
    (d / "config.json").write_text(open(os.path.join(FIXTURE, "config.json")).read())
    config, params, ema, step, _ = convert.load_diffusers(str(d), BASE)
    assert max(_rel_err(params, config)) < RTOL


# ------------------------------------------------------------------------------ TF1 checkpoint
def _write_released_tf_checkpoint(prefix, sd, *, levels, nrb, attn_levels, step, noise_seed=3):
    """A TF1 checkpoint named as the released code names it, holding the fixture's weights.

    Walks the layers in the order of ``diffusion_tf/models/unet.py`` (``model`` scope, temb,
    conv_in, down_{l}/block_{i}[/attn_{i}], down_{l}/downsample, mid, up_{l}/..., norm_out,
    conv_out), with ``nn.dense``/``nn.nin``/``nn.conv2d`` W/b and contrib group_norm beta/gamma.
    The EMA shadows (TF's own ExponentialMovingAverage) hold the fixture weights; the raw
    variables hold them plus noise. Returns ``{tf name: raw value}``.
    """
    import tensorflow as tf

    v1 = tf.compat.v1
    raw = {}
    rng = np.random.default_rng(noise_seed)

    init = {}

    def var(name, value):
        v = v1.get_variable(name, initializer=tf.constant(np.asarray(value, np.float32)))
        init[v.op.name] = np.asarray(value, np.float32)

    def dense(scope, d):  # nn.dense / nn.nin: W [in, out]
        w = sd[d + ".weight"]
        with v1.variable_scope(scope):
            var("W", (w[:, :, 0, 0] if w.ndim == 4 else w).T)
            var("b", sd[d + ".bias"])

    def conv(scope, d):  # nn.conv2d: W [kh, kw, in, out]
        with v1.variable_scope(scope):
            var("W", sd[d + ".weight"].transpose(2, 3, 1, 0))
            var("b", sd[d + ".bias"])

    def norm(scope, d):  # tf.contrib.layers.group_norm(scope=...): beta, gamma
        with v1.variable_scope(scope):
            var("beta", sd[d + ".bias"])
            var("gamma", sd[d + ".weight"])

    def resnet_block(name, d):
        with v1.variable_scope(name):
            norm("norm1", d + ".norm1")
            conv("conv1", d + ".conv1")
            dense("temb_proj", d + ".time_emb_proj")
            norm("norm2", d + ".norm2")
            conv("conv2", d + ".conv2")
            if d + ".conv_shortcut.weight" in sd:
                dense("nin_shortcut", d + ".conv_shortcut")

    def attn_block(name, d):
        with v1.variable_scope(name):
            norm("norm", d + ".group_norm")
            dense("q", d + ".to_q")
            dense("k", d + ".to_k")
            dense("v", d + ".to_v")
            dense("proj_out", d + ".to_out.0")

    g = tf.Graph()
    with g.as_default():
        with v1.variable_scope("model"):
            with v1.variable_scope("temb"):
                dense("dense0", "time_embedding.linear_1")
                dense("dense1", "time_embedding.linear_2")
            conv("conv_in", "conv_in")
            for lvl in range(levels):
                with v1.variable_scope(f"down_{lvl}"):
                    for i in range(nrb):
                        resnet_block(f"block_{i}", f"down_blocks.{lvl}.resnets.{i}")
                        if lvl in attn_levels:
                            attn_block(f"attn_{i}", f"down_blocks.{lvl}.attentions.{i}")
                    if lvl != levels - 1:
                        with v1.variable_scope("downsample"):
                            conv("conv", f"down_blocks.{lvl}.downsamplers.0.conv")
            with v1.variable_scope("mid"):
                resnet_block("block_1", "mid_block.resnets.0")
                attn_block("attn_1", "mid_block.attentions.0")
                resnet_block("block_2", "mid_block.resnets.1")
            for lvl in reversed(range(levels)):
                j = levels - 1 - lvl
                with v1.variable_scope(f"up_{lvl}"):
                    for i in range(nrb + 1):
                        resnet_block(f"block_{i}", f"up_blocks.{j}.resnets.{i}")
                        if lvl in attn_levels:
                            attn_block(f"attn_{i}", f"up_blocks.{j}.attentions.{i}")
                    if lvl != 0:
                        with v1.variable_scope("upsample"):
                            conv("conv", f"up_blocks.{j}.upsamplers.0.conv")
            norm("norm_out", "conv_norm_out")
            conv("conv_out", "conv_out")
        trainable = v1.trainable_variables()
        global_step = v1.train.get_or_create_global_step()
        loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in trainable])
        v1.train.AdamOptimizer(1e-4).minimize(loss, global_step=global_step, var_list=trainable)
        ema = v1.train.ExponentialMovingAverage(decay=0.9999)
        ema.apply(trainable)
        feeds, assigns = {}, [global_step.assign(step)]
        for v in trainable:  # one graph extension and one run: each sess.run costs ~0.3 s
            ph = v1.placeholder(tf.float32, v.shape)
            val = init[v.op.name] + rng.standard_normal(v.shape).astype(np.float32) * 0.05
            feeds[ph], raw[v.op.name] = val, val
            assigns.append(v.assign(ph))
        assign_all = tf.group(*assigns)
        saver = v1.train.Saver()
        with v1.Session(graph=g) as sess:
            sess.run(v1.global_variables_initializer())  # shadows := the fixture weights
            sess.run(assign_all, feed_dict=feeds)  # raw := fixture weights + noise
            saver.save(sess, prefix)
            names = {v.op.name for v in v1.global_variables()}
    assert "model/down_0/block_0/conv1/W/ExponentialMovingAverage" in names
    assert "model/down_0/block_0/conv1/W/Adam_1" in names and "beta1_power" in names
    return raw


@pytest.fixture(scope="module")
def tf_checkpoint(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tfckpt") / "model.ckpt-1234")
    raw = _write_released_tf_checkpoint(
        prefix, _tensors(), levels=2, nrb=1, attn_levels=(1,), step=1234
    )
    return prefix, raw


@pytest.mark.slow
def test_tf_checkpoint_ema_params_and_step(tf_checkpoint, tmp_path):
    """EMA shadows -> ema_params reproduce the fixture outputs; raw weights -> params exactly;
    global_step -> step; Adam slots / beta powers are reported, not converted."""
    prefix, raw = tf_checkpoint
    wd = str(tmp_path / "wd")
    rep = convert.convert(prefix, wd, source="auto", base=BASE)
    assert rep["source"] == "tf" and rep["scope"] == "model" and rep["step"] == 1234
    assert rep["num_params"] == 702_499
    assert "model/conv_in/W/Adam" in rep["not_converted"]
    assert "model/conv_in/W/ExponentialMovingAverage/Adam" not in rep["not_converted"]
    assert {"beta1_power", "beta2_power", "global_step"} <= set(rep["not_converted"])
    config, params, ema, step = _restore(wd)
    assert step == 1234
    assert max(_rel_err(ema, config)) < RTOL
    assert max(_rel_err(params, config)) > 1e-3  # the raw weights are the noisy ones
    np.testing.assert_array_equal(
        params["down_1_block_0"]["nin_shortcut"]["kernel"],
        raw["model/down_1/block_0/nin_shortcut/W"],
    )
    np.testing.assert_array_equal(
        params["mid_attn_1"]["norm"]["scale"], raw["model/mid/attn_1/norm/gamma"]
    )
    np.testing.assert_array_equal(
        params["up_1_upsample"]["conv"]["kernel"], raw["model/up_1/upsample/conv/W"]
    )
    np.testing.assert_array_equal(params["temb"]["dense1"]["bias"], raw["model/temb/dense1/b"])


@pytest.mark.slow
def test_tf_checkpoint_folder_and_errors(tf_checkpoint, tmp_path):
    """A folder with a 'checkpoint' file works; an unknown variable, a missing EMA shadow and a
    wrong shape are named."""
    import tensorflow as tf

    prefix, _ = tf_checkpoint
    reader = tf.train.load_checkpoint(prefix)
    vals = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()}

    def save(vs, name):
        d = tmp_path / name
        d.mkdir()
        p = str(d / "model.ckpt-7")
        with tf.Graph().as_default():
            tvars = [tf.compat.v1.Variable(v, name=k) for k, v in vs.items()]
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                tf.compat.v1.train.Saver({v.op.name: v for v in tvars}).save(sess, p)
        return str(d), p

    d, _ = save(vals, "ok")
    config, params, ema, step, rep = convert.load_tf(d, BASE)  # folder -> latest checkpoint
    assert step == 1234 and max(_rel_err(ema, config)) < RTOL

    extra = dict(vals, **{"model/down_0/block_0/mystery/W": np.zeros((3,), np.float32)})
    _, p = save(extra, "extra")
    with pytest.raises(convert.ConversionError, match="model/down_0/block_0/mystery/W"):
        convert.load_tf(p, BASE)
    convert.load_tf(p, BASE, ignore=[r"/mystery/"])  # --ignore lets it through

    no_ema = {k: v for k, v in vals.items() if k != "model/mid/attn_1/q/b/ExponentialMovingAverage"}
    _, p = save(no_ema, "no_ema")
    with pytest.raises(
        convert.ConversionError, match="missing.*\n.*model/mid/attn_1/q/b/ExponentialMovingAverage"
    ):
        convert.load_tf(p, BASE)

    bad = dict(vals, **{"model/up_0/block_1/conv2/W": np.zeros((3, 3, 32, 31), np.float32)})
    _, p = save(bad, "bad_shape")
    with pytest.raises(
        convert.ConversionError,
        match=r"model/up_0/block_1/conv2/W: shape \(3, 3, 32, 31\), expected "
        r"\(3, 3, 32, 32\)",
    ):
        convert.load_tf(p, BASE)


# ------------------------------------------------------------------------------ name maps
@pytest.mark.parametrize(
    "base,expected",
    [("cifar10", 35_746_307), ("celebahq256", 113_673_219), ("lsun_church", 113_673_219)],
)
@pytest.mark.slow
def test_name_maps_cover_paper_models(base, expected):
    """Both name maps cover every parameter of the paper's models (shapes only), each source
    name used once, and a source holding exactly those names and shapes matches."""
    config = convert.base_config(base)
    params = convert.abstract_params(config)
    leaves = convert.common._flat(params)
    assert sum(int(np.prod(v.shape)) for v in leaves.values()) == expected
    for name_map in (convert.tf_name_map(params), convert.diffusers_name_map(params)):
        assert set(name_map) == set(leaves)
        first = [t.names[0] for t in name_map.values()]
        assert len(set(first)) == len(first)
        assert sum(int(np.prod(t.shape)) for t in name_map.values()) == expected
        chosen, skipped = convert.match_tensors(
            name_map, {t.names[0]: t.shape for t in name_map.values()}
        )
        assert len(chosen) == len(leaves) and not skipped
    tf_names = {t.names[0] for t in convert.tf_name_map(params).values()}
    lvl = {32: 1, 256: 4}[config.data.image_size]  # attention at 16x16
    top = len(config.model.ch_mult) - 1
    assert f"model/down_{lvl}/attn_1/q/W" in tf_names and f"model/up_{lvl}/attn_2/k/b" in tf_names
    assert f"model/down_{lvl + 1}/attn_0/q/W" not in tf_names
    assert "model/mid/attn_1/proj_out/b" in tf_names and "model/norm_out/gamma" in tf_names
    assert (
        f"model/up_{top}/upsample/conv/W" in tf_names
        and "model/up_0/upsample/conv/W" not in tf_names
    )
    assert f"model/down_{top - 1}/downsample/conv/W" in tf_names
    assert f"model/down_{top}/downsample/conv/W" not in tf_names


@pytest.mark.slow
def test_diffusers_map_matches_fixture_names():
    """The map's names and torch shapes are exactly those diffusers wrote for the fixture."""
    config = convert.config_from_diffusers(
        json.load(open(os.path.join(FIXTURE, "config.json"))), BASE
    )
    name_map = convert.diffusers_name_map(convert.abstract_params(config))
    t = _tensors()
    assert {n.names[0]: n.shape for n in name_map.values()} == {k: v.shape for k, v in t.items()}


# ------------------------------------------------------------------------------ errors
@pytest.mark.slow
def test_diffusers_errors_name_the_tensor(tmp_path):
    from safetensors.numpy import save_file

    t = _tensors()
    cfg = open(os.path.join(FIXTURE, "config.json")).read()

    def folder(tensors, name, config_text=cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / convert.DIFFUSERS_WEIGHTS))
        (d / "config.json").write_text(config_text)
        return str(d)

    missing = {k: v for k, v in t.items() if k != "up_blocks.0.resnets.1.conv_shortcut.weight"}
    with pytest.raises(
        convert.ConversionError,
        match=r"missing \(1\):\n.*up_blocks\.0\.resnets\.1\.conv_shortcut\.weight "
        r"\(64, 96, 1, 1\) \(for up_1_block_1/nin_shortcut/kernel\)",
    ):
        convert.load_diffusers(folder(missing, "missing"), BASE)

    extra = dict(t, **{"mid_block.attentions.1.to_q.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(
        convert.ConversionError,
        match=r"unexpected \(not consumed\) \(1\):\n.*mid_block\.attentions\.1\."
        r"to_q\.weight \(64, 64\)",
    ):
        convert.load_diffusers(folder(extra, "extra"), BASE)

    wrong = dict(t, **{"conv_out.weight": np.zeros((3, 32, 1, 1), np.float32)})
    with pytest.raises(
        convert.ConversionError,
        match=r"conv_out\.weight: shape \(3, 32, 1, 1\), expected \(3, 32, 3, 3\)",
    ):
        convert.load_diffusers(folder(wrong, "wrong"), BASE)

    both = dict(
        t, **{"mid_block.attentions.0.query.weight": t["mid_block.attentions.0.to_q.weight"]}
    )
    with pytest.raises(
        convert.ConversionError,
        match="mid_block.attentions.0.to_q.weight and mid_block.attentions.0.query.weight",
    ):
        convert.load_diffusers(folder(both, "both"), BASE)


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("downsample_padding", 1, "downsample_padding=1"),
        ("attention_head_dim", 8, "attention_head_dim=8"),
        ("flip_sin_to_cos", True, "flip_sin_to_cos=True"),
        ("norm_eps", 1e-5, "norm_eps=1e-05"),
        ("up_block_types", ["UpBlock2D", "UpBlock2D"], "level 1: attention"),
    ],
)
def test_diffusers_config_mismatch_is_named(field, value, msg):
    cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
    cfg[field] = value
    with pytest.raises(convert.ConversionError, match=msg):
        convert.config_from_diffusers(cfg, BASE)
    cfg.pop(field)
    if field in ("downsample_padding", "attention_head_dim", "flip_sin_to_cos", "norm_eps"):
        # a config.json without the field gets diffusers' default, which does not fit either
        with pytest.raises(convert.ConversionError, match=field):
            convert.config_from_diffusers(cfg, BASE)


def test_existing_workdir_is_refused(tmp_path):
    wd = tmp_path / "wd"
    (wd / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="new --workdir"):
        convert.convert(FIXTURE, str(wd), base=BASE)


@pytest.mark.slow
def test_converted_config_takes_command_line_overrides(tmp_path):
    """The README's commands override unset fields of the converted config from the command line
    (--config.data.data_dir, --config.eval.inception_weights): they must keep their types. A
    config rebuilt from JSON alone had them as plain None, which absl refuses to override."""
    from diffusion import convert

    wd = str(tmp_path / "wd")
    assert convert.main(["--input", FIXTURE, "--workdir", wd, "--base", BASE]) == 0
    code = (
        "import sys\n"
        "from absl import app\n"
        "from ml_collections import config_flags\n"
        "F = config_flags.DEFINE_config_file('config')\n"
        "def main(_):\n"
        "    c = F.value\n"
        "    assert c.data.data_dir == '/tmp/tfds', c.data.data_dir\n"
        "    assert c.eval.inception_weights == '/tmp/w.pth'\n"
        "    assert c.eval.num_samples == 8 and c.model.ch == 32 and c.data.image_size == 32\n"
        "    assert tuple(c.model.ch_mult) == (1, 2)\n"
        "    print('OK')\n"
        f"sys.argv = ['x', '--config={wd}/config.py', '--config.data.data_dir=/tmp/tfds',\n"
        "            '--config.eval.inception_weights=/tmp/w.pth', '--config.eval.num_samples=8']\n"
        "app.run(main)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


# ------------------------------------------------------------------------------ one-line errors
def _one_line_error(capsys, argv):
    """``(exit status, the stderr line)`` of ``convert.main(argv)``, which must print exactly
    one line on stderr (no traceback)."""
    rc = convert.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return rc, err[0]


def test_truncated_safetensors_is_one_line_error(tmp_path, capsys):
    """A cut-short diffusion_pytorch_model.safetensors: one line naming the file, that it is
    truncated or corrupt, and the fix; status 2 (was a SafetensorError traceback)."""
    d = tmp_path / "cut"
    d.mkdir()
    (d / "config.json").write_text(open(os.path.join(FIXTURE, "config.json")).read())
    data = open(os.path.join(FIXTURE, convert.DIFFUSERS_WEIGHTS), "rb").read()
    (d / convert.DIFFUSERS_WEIGHTS).write_bytes(data[: len(data) // 2])
    rc, line = _one_line_error(
        capsys, ["--input", str(d), "--workdir", str(tmp_path / "wd"), "--base", BASE]
    )
    assert rc == 2, line
    assert line.startswith("error: ") and str(d / convert.DIFFUSERS_WEIGHTS) in line, line
    assert "truncated or corrupt" in line and "download" in line, line
    assert not (tmp_path / "wd" / "checkpoints").exists()


def _save_tf_variables(prefix, shapes):
    """A TF1 name-based checkpoint at ``prefix`` with zero variables ``{name: shape}``."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default():
        vs = [v1.Variable(np.zeros(s, np.float32), name=n) for n, s in shapes.items()]
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            v1.train.Saver({v.op.name: v for v in vs}).save(sess, prefix)
    return prefix


def test_tf_unknown_level_count_names_checkpoint_and_fix(tmp_path, capsys):
    """A 3-level TF U-Net without --base: the message names the checkpoint, the 3 levels, that
    the image size is not known, and --base with the valid names (it said "-1x-1 images")."""
    prefix = _save_tf_variables(
        str(tmp_path / "model.ckpt-5"),
        {
            "model/temb/dense0/W": (8, 8),
            "model/conv_in/W": (3, 3, 3, 8),
            "model/conv_out/W": (3, 3, 8, 3),
            **{f"model/down_{lvl}/block_0/conv1/W": (3, 3, 8, 8) for lvl in range(3)},
        },
    )
    rc, line = _one_line_error(capsys, ["--input", prefix, "--workdir", str(tmp_path / "wd")])
    assert rc == 2, line
    assert prefix in line and "3 levels" in line and "-1x-1" not in line, line
    assert "--base" in line and all(b in line for b in convert.BASES), line


@pytest.mark.slow
def test_bad_tf_checkpoint_files_are_named(tf_checkpoint, tmp_path, capsys):
    """A truncated .index or .data file of a TF checkpoint: one line naming the checkpoint and
    that its files are truncated or corrupt; status 2."""
    import glob
    import shutil

    src, _ = tf_checkpoint
    for part in ("index", "data"):
        d = tmp_path / part
        d.mkdir()
        for f in glob.glob(src + ".*"):
            shutil.copy(f, d)
        prefix = str(d / os.path.basename(src))
        victim = glob.glob(prefix + (".index" if part == "index" else ".data-*"))[0]
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) // 2])
        rc, line = _one_line_error(
            capsys, ["--input", prefix, "--workdir", str(d / "wd"), "--base", BASE]
        )
        assert rc == 2, (part, line)
        assert prefix in line and "truncated or corrupt" in line, (part, line)


def test_unexpected_error_is_one_line(tmp_path, capsys, monkeypatch):
    """Any other exception: its type and text on one line, status 1 (no traceback)."""

    def boom(*a, **k):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(convert.cli, "convert", boom)
    rc, line = _one_line_error(capsys, ["--input", FIXTURE, "--workdir", str(tmp_path / "wd")])
    assert rc == 1
    assert line.startswith("error: RuntimeError: disk on fire") and "second line" in line, line


def test_unknown_base_is_named(tmp_path, capsys):
    """--base with no experiments/<name>.py: one line with the valid names, status 2 (was a
    ModuleNotFoundError traceback)."""
    rc, line = _one_line_error(
        capsys, ["--input", FIXTURE, "--workdir", str(tmp_path / "wd"), "--base", "nosuch"]
    )
    assert rc == 2 and "--base nosuch" in line and all(b in line for b in convert.BASES), line
