"""The Table 2 learning-curve driver (experiments/table2_curves.py): its schedule and stopping
rule against hand-worked cases, and a real (tiny) plan that is interrupted and resumed: the
resumed point equals the one measured without interruption."""

import json
import os
import shutil

import pytest
from test_reproduce import TINY, fake_features

from experiments import table2_curves as tc


def test_eval_points_put_bound_and_fid_where_the_plan_says():
    pts = tc.eval_points(10_000, 1000, 2500)
    assert [s for s, _, _ in pts] == [
        1000, 2000, 2500, 3000, 4000, 5000, 6000, 7000, 7500, 8000, 9000, 10000
    ]  # fmt: skip
    assert [s for s, _, f in pts if f] == [2500, 5000, 7500, 10000]
    assert [s for s, b, _ in pts if b] == [s for s in range(1000, 10001, 1000)]
    assert tc.eval_points(7, 3, 5) == [(3, True, False), (5, False, True), (6, True, False),
                                       (7, True, True)]  # fmt: skip


def test_stopping_rule_needs_three_bounds_within_the_latest_se():
    p = lambda b, se=0.05: {"bpd": b, "bpd_se": se}  # noqa: E731
    assert not tc.converged([p(3.0), p(2.99)])  # fewer than three
    assert tc.converged([p(3.5), p(3.0), p(2.99), p(3.02)])  # 3.02 - 2.99 < 0.05
    assert not tc.converged([p(3.0), p(2.9), p(2.95)])  # moved 0.1 > 0.05
    assert not tc.converged([p(3.0), p(3.0), p(3.0, float("nan"))])
    # FID-only points do not count as bound evaluations
    assert tc.converged([p(3.0), {"bpd": None, "fid": 50}, p(3.01), p(3.0)])


PLAN = {
    "max_steps": 4,
    "bound_every": 2,
    "fid_every": 4,
    "bound_examples": 4,
    "bound_timesteps": 10,
    "fid_samples": 8,
    "window": 3,
}


@pytest.mark.slow
def test_tiny_plan_runs_resumes_and_draws(tmp_path, data_dir):
    over = {k: v for k, v in TINY.items() if not k.startswith("eval.num_samples")}
    over["training.log_every"] = 1
    over["training.checkpoint_every"] = 2
    kw = dict(
        stage1_rows=["eps_L_fixed_is"],  # one run (stage 2 empty): CI time
        stage1_seeds=[0],
        stage2_rows=[],
        overrides=over,
        data_dir=data_dir,
        feature_fn=fake_features,
        feature_network="fake",
    )
    out, rec_path = str(tmp_path / "out"), str(tmp_path / "record.json")
    record = tc.run_plan(out, rec_path, PLAN, **kw)
    runs = record["runs"]
    assert set(runs) == {"eps_L_fixed_is_seed0"}
    for r in runs.values():
        assert r["status"] == "max_steps" and r["final_step"] == 4
        pts = r["points"]
        assert [p["step"] for p in pts] == [2, 4]
        assert pts[0]["fid"] is None and pts[1]["fid"] is not None
        assert all(p["bpd"] > 0 and p["bpd_se"] > 0 and p["train_loss"] > 0 for p in pts)
        assert pts[1]["floor_fid"] is not None and pts[1]["num_gen"] == 8
    assert record["stage2_steps"] == 4
    # The importance row really trained with the importance sampler.
    saved = json.load(open(os.path.join(out, "runs", "eps_L_fixed_is_seed0", "config.json")))
    assert saved["training"]["t_sampler"] == "importance"
    # Interrupted after step 2 (the last point, its checkpoint and its evaluation lost): the
    # relaunch measures only that point again, and measures the same numbers.
    full = json.load(open(rec_path))
    name = "eps_L_fixed_is_seed0"
    cut = json.load(open(rec_path))
    cut["runs"][name]["points"] = cut["runs"][name]["points"][:1]
    cut["runs"][name]["status"] = "running"
    json.dump(cut, open(rec_path, "w"))
    curve = os.path.join(out, "runs", name, "curve.json")
    json.dump(cut["runs"][name], open(curve, "w"))
    shutil.rmtree(os.path.join(out, "runs", name, "checkpoints", "4"))
    shutil.rmtree(os.path.join(out, "runs", name, "eval"))  # no stored result to read back
    again = tc.run_plan(out, rec_path, PLAN, **kw)
    a, b = again["runs"][name]["points"][1], full["runs"][name]["points"][1]
    for k in ("bpd", "bpd_se", "fid", "kid", "train_loss"):
        assert a[k] == pytest.approx(b[k], rel=1e-5), k
    # A different plan is refused rather than mixed into the record.
    with pytest.raises(ValueError, match="another plan"):
        tc.run_plan(out, rec_path, dict(PLAN, max_steps=6), **kw)
    fig = str(tmp_path / "curves.png")
    tc.plot_curves(again, fig)
    assert os.path.getsize(fig) > 10_000
    table = tc.markdown_table(again)
    assert "| eps_L_fixed_is | 1 | 4 | max_steps@4 |" in table


def test_a_signal_during_training_ends_the_plan_without_recording_a_point(tmp_path, monkeypatch):
    """SIGTERM makes the training loop save and return early; the driver must not evaluate or
    record the step it did not reach (it did before: the point was filed under the target step)."""
    from types import SimpleNamespace

    from diffusion import evaluate, training

    monkeypatch.setattr(training, "train", lambda config, workdir: SimpleNamespace(step=1))
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("evaluated a partial run"))
    record = {"runs": {}}
    with pytest.raises(tc.PlanInterrupted, match="stopped at step 1 of 2"):
        tc.run_curve("eps_simple", 0, 4, str(tmp_path), PLAN, record, lambda: None, stop_rule=False)
    assert record["runs"]["eps_simple_seed0"]["points"] == []
