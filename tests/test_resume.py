"""Resuming never silently restarts: a checkpoint that does not match the config is refused with
the differences named (nothing moved), transient read errors are retried, only undecodable data
is quarantined, and a workdir whose checkpoints all fail stops instead of starting from step 0."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_worker import small_config

from diffusion import checkpoint, factories, training
from diffusion.checkpoint import (
    Checkpointer,
    CheckpointIncompatibleError,
    CheckpointReadError,
    NoRestorableCheckpointError,
    abstract_like,
)
from diffusion.config_check import incompatible_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toy_state(seed, tx, shape=(64, 64)):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.standard_normal(shape), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32),
    }
    return factories.TrainState(
        step=jnp.array(seed, jnp.int32),
        params=params,
        ema_params=jax.tree.map(lambda x: 0.5 * x, params),
        opt_state=tx.init(params),
    )


def _saved_dir(tmp_path, steps=(1, 2), config=None):
    c = config or small_config("unused", 1)
    tx = factories.make_optimizer(c)
    d = str(tmp_path / "checkpoints")
    ck = Checkpointer(d, max_to_keep=5)
    for s in steps:
        ck.save(
            s,
            _toy_state(s, tx),
            {"step": s, "training": {"grad_clip": c.training.grad_clip, "weight_decay": 0.0}},
        )
    ck.close()
    return d, tx


def _listing(d):
    return sorted(os.listdir(d)), (
        sorted(os.listdir(d + "_corrupt")) if os.path.exists(d + "_corrupt") else []
    )


def _abstract(tx, shape=(64, 64)):
    return abstract_like(jax.eval_shape(lambda: _toy_state(1, tx, shape)))


# ----------------------------------------------------------------------------- (a) mismatch
def test_optimizer_stage_change_is_refused_with_the_differences_and_nothing_moves(tmp_path):
    d, _ = _saved_dir(tmp_path)
    before = _listing(d)
    c = small_config("unused", 1)
    c.training.grad_clip = 0.0  # the chain loses its clipping stage
    tx = factories.make_optimizer(c)
    ck = Checkpointer(d)
    with pytest.raises(CheckpointIncompatibleError) as e:
        ck.restore_latest(
            _abstract(tx),
            how_to_proceed="HOW",
            config_differences=lambda saved: incompatible_fields(saved, c),
        )
    msg = str(e.value)
    assert "step 2" in msg and "nothing was moved" in msg and msg.rstrip().endswith("HOW")
    assert "training.grad_clip > 0 (a clipping stage): True (saved) -> False (now)" in msg
    assert "opt_state/0/" in msg and "opt_state/2/count" in msg  # the tree paths that differ
    assert _listing(d) == before  # untouched, not quarantined


def test_parameter_shape_change_is_refused_naming_the_path(tmp_path):
    d, tx = _saved_dir(tmp_path)
    before = _listing(d)
    with pytest.raises(
        CheckpointIncompatibleError,
        match=r"shape differs: params/w saved \(64, 64\), now \(32, 64\)",
    ):
        Checkpointer(d).restore_latest(_abstract(tx, (32, 64)))
    assert _listing(d) == before


def test_every_tree_changing_switch_is_a_resume_difference():
    c = small_config("unused", 1)
    saved = factories.config_to_dict(c)
    assert incompatible_fields(saved, c) == []
    for field, value in (("grad_clip", 0.0), ("weight_decay", 1e-4)):
        c2 = small_config("unused", 1)
        setattr(c2.training, field, value)
        diffs = incompatible_fields(saved, c2)
        assert len(diffs) == 1 and f"training.{field} > 0" in diffs[0]
        # The parts of the tree each switch changes really differ (so the check is not vacuous).
        t1 = jax.eval_shape(lambda: factories.make_optimizer(c).init({"w": jnp.zeros(3)}))
        t2 = jax.eval_shape(lambda: factories.make_optimizer(c2).init({"w": jnp.zeros(3)}))
        assert jax.tree.structure(t1) != jax.tree.structure(t2)
        assert incompatible_fields(saved, c2, optimizer=False) == []
    c3 = small_config("unused", 1)
    c3.training.grad_clip = 0.5  # a different value of the same stage: same tree, resumable
    assert incompatible_fields(saved, c3) == []


def test_params_only_resume_takes_params_and_ema_into_a_new_optimizer(tmp_path):
    d, _ = _saved_dir(tmp_path)
    c = small_config("unused", 1)
    c.training.grad_clip = 0.0
    tx = factories.make_optimizer(c)
    got, _, step = Checkpointer(d).restore_latest(_abstract(tx), params_only=True)
    assert step == 2 and set(got) == {"step", "params", "ema_params"}
    want = _toy_state(2, tx)
    np.testing.assert_array_equal(got["params"]["w"], want.params["w"])
    np.testing.assert_array_equal(got["ema_params"]["w"], want.ema_params["w"])
    assert int(got["step"]) == 2


# ----------------------------------------------------------------------------- (b) transient
def test_transient_oserror_is_retried_and_resumes_at_the_newest_step(tmp_path, monkeypatch):
    d, tx = _saved_dir(tmp_path)
    before = _listing(d)
    real = Checkpointer.restore
    calls = []

    def flaky(self, step, abstract):
        calls.append(step)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (injected)")
        return real(self, step, abstract)

    monkeypatch.setattr(Checkpointer, "restore", flaky)
    state, cfg, step = Checkpointer(d, retry_delays=(0.01, 0.01)).restore_latest(_abstract(tx))
    assert step == 2 and calls == [2, 2] and cfg["step"] == 2
    np.testing.assert_array_equal(state.params["w"], _toy_state(2, tx).params["w"])
    assert _listing(d) == before


def test_tensorstore_unavailable_is_transient_and_a_persistent_one_stops_naming_the_step(
    tmp_path, monkeypatch
):
    assert checkpoint.is_transient_error(ValueError("UNAVAILABLE: connection reset"))
    assert not checkpoint.is_transient_error(ValueError("DATA_LOSS: bad checksum"))
    assert not checkpoint.is_transient_error(FileNotFoundError("gone"))
    d, tx = _saved_dir(tmp_path)
    before = _listing(d)

    def down(self, step, abstract):
        raise ValueError("UNAVAILABLE: the bucket did not answer (injected)")

    monkeypatch.setattr(Checkpointer, "restore", down)
    with pytest.raises(CheckpointReadError, match=r"step 2 .*after 3 attempts.*not moved"):
        Checkpointer(d, retry_delays=(0.01, 0.01)).restore_latest(_abstract(tx))
    assert _listing(d) == before  # a read error is not corruption: nothing quarantined


# ----------------------------------------------------------------------------- (c) corrupt
def _truncate(d, step):
    for root, _, files in os.walk(os.path.join(d, str(step), "state")):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(path) // 3))


def test_all_checkpoints_corrupt_stops_instead_of_starting_over(tmp_path):
    d, tx = _saved_dir(tmp_path)
    _truncate(d, 1)
    _truncate(d, 2)
    with pytest.raises(NoRestorableCheckpointError, match="Refusing to start again from step 0"):
        Checkpointer(d).restore_latest(_abstract(tx))
    steps, quarantined = _listing(d)
    assert [q.split("-")[0] for q in quarantined] == ["1", "2"]  # kept, not deleted
    # A second launch finds no step left, but remembers there were some.
    with pytest.raises(NoRestorableCheckpointError, match="earlier launches moved"):
        Checkpointer(d).restore_latest(_abstract(tx))
    # A directory that never held a checkpoint is a fresh start.
    assert Checkpointer(str(tmp_path / "fresh")).restore_latest(_abstract(tx)) is None


# ----------------------------------------------------------------------------- the real run
@pytest.mark.slow
def test_relaunch_with_grad_clip_off_exits_nonzero_and_keeps_the_checkpoint(tmp_path, data_dir):
    """The reproduction of the bug: train to step 4, relaunch the same workdir through
    launch.py with --config.training.grad_clip=0. Before the fix the intact checkpoint was moved
    to checkpoints_corrupt/ and training restarted from 0 with exit status 0."""
    wd = str(tmp_path / "run")
    c = small_config(data_dir, 4)
    training.train(c, wd)
    ck_dir = os.path.join(wd, "checkpoints")
    before = _listing(ck_dir)
    assert before[0][-1] == "4"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch.py"),
        "--config",
        "experiments/tiny.py",
        "--workdir",
        wd,
        "--mode",
        "train_and_evaluate",
        f"--config.data.data_dir={data_dir}",
        "--config.data.image_size=16",
        "--config.model.ch_mult=(1, 2)",
        "--config.model.attn_resolutions=(8,)",
        "--config.training.num_train_steps=8",
        "--config.training.grad_clip=0",
    ]
    env = {
        **{k: v for k, v in os.environ.items() if k != "DDPM_KEEP_FREED_MEMORY"},
        "PYTHONPATH": ROOT,
    }
    # The log says which heap mode ran; with the variable unset: glibc's defaults for a process
    # that evaluates, sync for one that only trains (cpu_runtime.keep_freed_memory).
    for mode, heap in (
        ("train_and_evaluate", "DDPM_KEEP_FREED_MEMORY=0 (glibc defaults)"),
        ("train", "DDPM_KEEP_FREED_MEMORY=sync (applied)"),
    ):
        cmd[cmd.index("--mode") + 1] = mode
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
        assert heap in p.stderr, p.stderr[-3000:]
        assert "does not match what this config builds" in p.stderr
        assert "training.grad_clip > 0" in p.stderr and "resume=params" in p.stderr
        assert _listing(ck_dir) == before and not os.path.exists(ck_dir + "_corrupt")
