"""The training loop's pieces on their own, without compiling a model (fast tier): the hooks'
cadence, `run_steps` with a Python step and fake checkpointer / writer (which steps log, save and
draw a grid; preemption; a failed save; a non-finite step), and `restore_or_init`'s outcomes."""

import os
import signal
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest

from diffusion.checkpoint import CheckpointIncompatibleError, CheckpointSaveError
from diffusion.factories import TrainState
from diffusion.training import hooks as hooks_lib
from diffusion.training.loop import Hooks, run_steps
from diffusion.training.restore import ResumeMismatchError, restore_or_init


def _config(num_steps=10, log_every=3, checkpoint_every=4, keep_every=5, sample_every=6):
    return ml_collections.ConfigDict(
        {
            "training": {
                "num_train_steps": num_steps,
                "log_every": log_every,
                "checkpoint_every": checkpoint_every,
                "keep_every": keep_every,
                "sample_every": sample_every,
                "nonfinite": "raise",
            }
        }
    )


class FakeCheckpointer:
    """Records saves; ``fail_poll_at`` makes ``poll`` raise after that step was dispatched."""

    directory = "/wd/checkpoints"

    def __init__(self, fail_poll_at=None):
        self.saved, self.closed, self.steps_polled = [], [], 0
        self.fail_poll_at = fail_poll_at
        self.manager = SimpleNamespace(reached_preemption=lambda step: False)

    @property
    def last_good(self):
        return self.saved[-1] if self.saved else None

    def save(self, step, state, config_dict):
        assert int(state.step) == step  # the state of that step, not an older one
        self.saved.append(step)

    def poll(self):
        self.steps_polled += 1
        if self.fail_poll_at == self.steps_polled:
            raise CheckpointSaveError("injected: the save failed")

    def close(self, after_error=False, should_abort=None):
        self.closed.append((after_error, should_abort))


class FakeWriter:
    def __init__(self):
        self.scalars, self.images, self.flushed = [], [], 0

    def write_scalars(self, step, scalars):
        self.scalars.append((step, scalars))

    def write_images(self, step, images):
        self.images.append(step)

    def flush(self):
        self.flushed += 1


def _step_fn(nonfinite_at=(), signal_at=None):
    """A Python 'train step' (no ``.lower``: used as is): step + 1, loss = the new step."""

    def step(state, batch, key):
        new = int(state.step) + 1
        if new == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        finite = 0.0 if new in nonfinite_at else 1.0
        return state.replace(step=np.int32(new)), {
            "loss": np.float32(new if finite else np.nan),
            "grad_norm": np.float32(1.0),
            "finite": np.float32(finite),
        }

    return step


def _run(config, start=0, ckpt=None, step_fn=None):
    tr = config.training
    ckpt = ckpt or FakeCheckpointer()
    writer = FakeWriter()
    grids = []
    pending = hooks_lib.PendingMetrics(tr.nonfinite, start, ckpt.directory)
    checkpoint = hooks_lib.CheckpointHook(ckpt, config, pending, start)
    sampler = lambda params, key: grids.append(int(params)) or np.zeros((1, 2, 2, 1), np.uint8)  # noqa: E731
    hooks = Hooks(
        report=lambda step: None,
        logger=hooks_lib.MetricsLogger(
            tr.log_every, tr.num_train_steps, pending, writer, None, lambda: ckpt.last_good
        ),
        checkpoint=checkpoint,
        grid=hooks_lib.GridHook(
            tr.sample_every,
            tr.num_train_steps,
            pending,
            lambda: sampler,
            None,
            None,
            writer,
            lambda: ckpt.last_good,
        ),
    )
    state = TrainState(step=np.int32(start), params=None, ema_params=start, opt_state=None)
    # ema_params tracks the step so the grid records which state it was drawn from
    fn = step_fn or _step_fn()

    def with_ema(state, batch, key):
        s, m = fn(state, batch, key)
        return s.replace(ema_params=int(s.step)), m

    out = run_steps(
        state,
        with_ema,
        iter(range(1000)),
        None,
        start=start,
        num_steps=tr.num_train_steps,
        ckpt=ckpt,
        pending=pending,
        hooks=hooks,
    )
    return out, ckpt, writer, grids


def test_cadence_rules_include_the_last_step_and_preemption():
    c = _config(num_steps=10, log_every=3, checkpoint_every=4, keep_every=5, sample_every=6)
    pending = hooks_lib.PendingMetrics("raise", 0, "/x")
    log = hooks_lib.MetricsLogger(3, 10, pending, FakeWriter(), None, lambda: None)
    ckpt = hooks_lib.CheckpointHook(FakeCheckpointer(), c, pending, 0)
    grid = hooks_lib.GridHook(6, 10, pending, None, None, None, FakeWriter(), lambda: None)
    steps = range(1, 11)
    assert [s for s in steps if log.due(s)] == [3, 6, 9, 10]
    assert [s for s in steps if ckpt.due(s)] == [4, 5, 8, 10]
    assert [s for s in steps if grid.due(s)] == [6, 10]
    assert ckpt.due(7, preempted=True) and not ckpt.due(7)


def test_run_steps_logs_saves_and_draws_at_their_steps_from_a_resumed_start():
    state, ckpt, writer, grids = _run(_config(), start=2)
    assert int(state.step) == 10
    assert [s for s, _ in writer.scalars] == [3, 6, 9, 10]
    # the mean over the steps since the last host sync (loss = step): the save at 8 fetched
    # steps 7 and 8, so the log at 9 averages step 9 alone
    assert dict(writer.scalars)[9]["loss"] == 9.0
    assert dict(writer.scalars)[3]["loss"] == 3.0  # only step 3 since the resume at 2
    assert ckpt.saved == [4, 5, 8, 10]
    assert grids == [6, 10]  # drawn from the state of that step
    assert ckpt.steps_polled == 8  # after every step
    assert ckpt.closed == [(False, None)] and writer.flushed == 1


def test_a_log_averages_every_step_since_the_last_sync():
    c = _config(num_steps=6, log_every=3, checkpoint_every=100, keep_every=100, sample_every=100)
    _, ckpt, writer, _ = _run(c)
    assert [(s, m["loss"], m["skipped_steps"]) for s, m in writer.scalars] == [
        (3, 2.0, 0.0),
        (6, 5.0, 0.0),
    ]
    assert ckpt.saved == [6]


def test_sigterm_saves_at_the_current_step_and_stops():
    state, ckpt, writer, grids = _run(_config(), step_fn=_step_fn(signal_at=7))
    assert int(state.step) == 7
    assert ckpt.saved == [4, 5, 7]
    assert [s for s, _ in writer.scalars] == [3, 6]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored


def test_a_failed_save_stops_the_loop_and_closes_bounded_after_the_error():
    ckpt = FakeCheckpointer(fail_poll_at=5)
    with pytest.raises(CheckpointSaveError):
        _run(_config(), ckpt=ckpt)
    assert ckpt.saved == [4]
    ((after_error, should_abort),) = ckpt.closed
    assert after_error is True and callable(should_abort) and should_abort() is False


def test_a_non_finite_step_raises_naming_it_and_the_last_saved_step():
    with pytest.raises(
        hooks_lib.NonFiniteError,
        match=r"Non-finite loss at step 7 .*last good checkpoint is step 5",
    ):
        _run(_config(log_every=100), step_fn=_step_fn(nonfinite_at=(7,)))


# ----------------------------------------------------------------------------- restore
class FakeRestore:
    def __init__(self, result=None, error=None):
        self.result, self.error, self.kwargs = result, error, None

    def restore_latest(self, abstract, **kwargs):
        self.kwargs = kwargs
        if self.error:
            raise self.error
        return self.result


def _restore(ckpt, params_only=False):
    return restore_or_init(
        ckpt,
        "abstract",
        init=lambda: "fresh",
        new_opt_state=lambda params: ("new_opt", params),
        params_only=params_only,
        workdir="/wd",
        config_differences=lambda saved: [],
    )


def test_restore_or_init_without_a_checkpoint_initialises():
    assert _restore(FakeRestore(None)) == "fresh"


def test_restore_or_init_resumes_the_whole_state():
    saved = TrainState(step=4, params="p", ema_params="e", opt_state="o")
    assert _restore(FakeRestore((saved, {}, 4))) is saved


def test_restore_or_init_params_only_keeps_step_params_ema_with_a_new_optimizer():
    saved = {"step": 4, "params": "p", "ema_params": "e"}
    ckpt = FakeRestore((saved, {}, 4))
    state = _restore(ckpt, params_only=True)
    assert state == TrainState(step=4, params="p", ema_params="e", opt_state=("new_opt", "p"))
    assert ckpt.kwargs["params_only"] is True


def test_restore_or_init_mismatch_is_a_resume_error_with_the_fix():
    ckpt = FakeRestore(error=CheckpointIncompatibleError("tree differs"))
    with pytest.raises(ResumeMismatchError, match="tree differs"):
        _restore(ckpt)
    assert "--config.training.resume=params" in ckpt.kwargs["how_to_proceed"]
    assert "/wd/config.json" in ckpt.kwargs["how_to_proceed"]


def test_the_hooks_hold_no_reference_cycle_so_the_checkpointer_is_freed_at_once():
    """A cycle (hooks -> buffer -> hooks) kept a failed run's Orbax manager, and its failed
    write tasks, alive until the garbage collector ran (their errors then printed at exit)."""
    import gc
    import weakref

    from clu import metric_writers, periodic_actions  # noqa: F401  (a first import keeps its

    # caller's frame alive through importlib; import before, as a run has)
    from diffusion.training.loop import make_hooks

    c = _config()
    c.seed = 0
    ckpt = FakeCheckpointer()
    ref = weakref.ref(ckpt)
    gc.disable()
    try:
        hooks, pending = make_hooks(c, "/wd", ckpt, FakeWriter(), None, None, 0, main=False)
        hooks.checkpoint.save(4, TrainState(step=np.int32(4), params=0, ema_params=0, opt_state=0))
        assert pending.last_saved == 4  # the buffer's error message names the newest save
        del hooks, pending, ckpt
        assert ref() is None
    finally:
        gc.enable()
