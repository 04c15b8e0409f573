"""The Table 2 learning-curve driver (experiments/table2_curves.py): its schedule and stopping
rule against hand-worked cases, and a real (tiny) plan that is interrupted and resumed: the
resumed point equals the one measured without interruption."""

import json
import os
import shutil

import numpy as np
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


# ----------------------------------------------------------------------------- verdicts
def _run(row, seed, bounds, fids=(), status="converged", health=None, se=0.05):
    """A record entry: bounds every 1,000 steps, FIDs every 2,500 (as the plan evaluates)."""
    pts = {}
    for i, b in enumerate(bounds):
        pts[1000 * (i + 1)] = {"step": 1000 * (i + 1), "bpd": b, "bpd_se": se, "fid": None}
    for i, f in enumerate(fids):
        s = 2500 * (i + 1)
        pts.setdefault(s, {"step": s, "bpd": None, "bpd_se": None})["fid"] = f
    r = {"row": row, "seed": seed, "status": status, "final_step": max(pts),
         "points": [pts[k] for k in sorted(pts)]}  # fmt: skip
    if health:
        r["health"] = health
    return r


def _record(*runs):
    return {"runs": {f"{r['row']}_seed{r['seed']}": r for r in runs}}


def _verdicts(record):
    return {c["claim"].split(":")[0].split(" ")[0]: c for c in tc.claims(record)}


def test_nll_verdict_is_a_two_se_test_on_the_seed_means():
    simple = [_run("eps_simple", s, [3.0, 2.8, b]) for s, b in enumerate([2.70, 2.72, 2.74])]
    # L lower by 0.2 with seed s.d. 0.02 each: difference −0.20 ± 0.016 → reproduced.
    low = [_run("eps_L_fixed", s, [3.2, 2.7, b]) for s, b in enumerate([2.50, 2.52, 2.54])]
    v = _verdicts(_record(*simple, *low))["NLL"]
    assert v["verdict"] == "reproduced"
    assert "L − L_simple = -0.200 ± 0.016" in v["evidence"]
    assert "at step 3000 (every seed): 2.520 ± 0.020 vs 2.720 ± 0.020" in v["evidence"]
    # Higher by 0.2 → not reproduced; the slope of each L run's last three bounds is reported.
    high = [_run("eps_L_fixed", s, [3.2, 3.0, b]) for s, b in enumerate([2.90, 2.92, 2.94])]
    v = _verdicts(_record(*simple, *high))["NLL"]
    assert v["verdict"] == "not reproduced"
    assert "-0.150, -0.140, -0.130 bits/dim per 1k steps" in v["evidence"]
    # Within 2 s.e. (seed spread 0.3 swamps a 0.02 difference) → not resolved.
    wide = [_run("eps_L_fixed", s, [3.2, 3.0, b]) for s, b in enumerate([2.44, 2.74, 3.04])]
    assert _verdicts(_record(*simple, *wide))["NLL"]["verdict"] == "not resolved at this budget"
    # One L seed: no spread to test against.
    assert _verdicts(_record(*simple, low[0]))["NLL"]["verdict"] == "not resolved at this budget"
    # The importance-sampled row is placed against both: 2.75 is within 2 s.d. of L_simple.
    isr = _run("eps_L_fixed_is", 0, [3.0, 2.9, 2.75])
    v = _verdicts(_record(*simple, *high, isr))["NLL"]
    assert "2.750 ± 0.050 at step 3000 (1 seed), which closes the gap" in v["evidence"]
    assert "; at step 3000: 2.750 vs ε/L_simple 2.720 ± 0.020" in v["evidence"]
    isr = _run("eps_L_fixed_is", 0, [3.0, 2.9, 2.85])  # below L's 2.92 − 2·0.02
    assert "narrows it" in _verdicts(_record(*simple, *high, isr))["NLL"]["evidence"]
    isr = _run("eps_L_fixed_is", 0, [3.0, 2.9, 2.85, 2.6])  # below L_simple's 2.72 − 2·0.02
    v = _verdicts(_record(*simple, *high, isr))["NLL"]
    assert "2.600 ± 0.050 at step 4000 (1 seed), which reverses it" in v["evidence"]
    assert "; at step 3000: 2.850 vs ε/L_simple 2.720 ± 0.020" in v["evidence"]  # last shared
    assert v["verdict"] == "not reproduced"  # the claim is about uniform t, as the paper trained


def test_mu_tilde_verdict_follows_usability_against_eps_L():
    epsL = [_run("eps_L_fixed", s, [3, 3, 3], fids=[60.0]) for s in range(2)]

    def mu(fixed, learned, mse, mse_status="max_steps", fixed_bounds=(4, 4, 4)):
        return [
            _run("xprev_L_fixed", 0, list(fixed_bounds), fids=fixed, status="max_steps"),
            _run("xprev_L_learned", 0, [4, 4, 4], fids=learned, status="max_steps"),
            _run("xprev_mse", 0, [9, 9, 9], fids=mse, status=mse_status),
        ]

    v = lambda *rows: _verdicts(_record(*epsL, *rows))["μ̃"]["verdict"]  # noqa: E731
    assert v(*mu([300, 100], [300, 110], [350, 340])) == "reproduced"  # ≤ 2 × 60; MSE unusable
    assert v(*mu([300, 100], [300, 110], [100, 90])) == "not reproduced"  # MSE usable too
    assert v(*mu([300, 200], [300, 110], [350, 340])) == "not resolved at this budget"  # falling
    assert v(*mu([200, 195], [300, 110], [350, 340])) == "not reproduced"  # flat and unusable
    # FID flat (or worse) but the bound still falls by 2 per 1k steps, more than its s.e. 0.05:
    # still training, so not resolved; falling by 0.04 per 1k (< s.e.) is flat.
    still = mu([200, 210], [300, 110], [350, 340], fixed_bounds=(30, 28, 26))
    assert v(*still) == "not resolved at this budget"
    assert "bound -2.00 per 1k steps" in _verdicts(_record(*epsL, *still))["μ̃"]["evidence"]
    flat = mu([200, 210], [300, 110], [350, 340], fixed_bounds=(26.08, 26.04, 26.0))
    assert v(*flat) == "not reproduced"
    # A diverged MSE row counts as unusable whatever its last FID.
    assert v(*mu([300, 100], [300, 110], [100, 90], "diverged")) == "reproduced"
    assert _verdicts(_record(*epsL))["μ̃"]["verdict"] == "not resolved at this budget"


def test_mu_tilde_rows_no_better_than_the_mean_digit_repeated_are_not_usable():
    """The collapse anchor (as measured: ε/L's FID 179 made 2× admit an MSE row whose 128
    samples were one image): with the mean digit repeated at FID 283 in the record, an MSE row at
    324 is unusable, so rows still training are not resolved rather than "MSE works"."""
    epsL = [_run("eps_L_fixed", s, [3, 3, 3], fids=[f]) for s, f in enumerate([180.0, 178.0])]
    falling = [30, 28, 26]  # −2 bits/dim per 1k steps, s.e. 0.05: still training
    rows = [
        _run("xprev_L_fixed", 0, falling, fids=[300, 307], status="max_steps"),
        _run("xprev_L_learned", 0, falling, fids=[285, 298], status="max_steps"),
        _run("xprev_mse", 0, falling, fids=[334, 324], status="max_steps"),
    ]
    rec = _record(*epsL, *rows)
    assert _verdicts(rec)["μ̃"]["verdict"] == "not reproduced"  # 324 ≤ 2 × 179: "usable"
    rec["baselines"] = {"num": 128, "fid": {"mean_digit": 283.0}}
    v = _verdicts(rec)["μ̃"]
    assert v["verdict"] == "not resolved at this budget"
    assert "below the mean training digit repeated (283.0)" in v["evidence"]
    # Below the anchor and within 2× of ε/L they count as usable again.
    rows[0]["points"][-1]["fid"] = rows[1]["points"][-1]["fid"] = 200.0
    assert _verdicts(rec)["μ̃"]["verdict"] == "reproduced"
    rows[2]["points"][-1]["fid"] = 250.0
    assert _verdicts(rec)["μ̃"]["verdict"] == "not reproduced"


def test_trivial_baselines_fit_the_training_pixels_and_score_the_mean_digit_in_closed_form(
    data_dir,
):
    """`experiments.trivial_baselines` on real digits with pixel features: the mean digit's FID
    is |μ_ref − m|² + tr(Σ_ref) exactly (its samples have no spread); the Gaussians have the
    training pixels' moments, and each step of knowledge lowers the FID."""
    import numpy as np

    from diffusion.data import load_split
    from experiments import trivial_baselines as tb

    train = load_split("mnist5k", "train", data_dir=data_dir, image_size=16)
    imgs = tb.baseline_images(train, 4000, seed=1)
    flat = train.reshape(len(train), -1).astype(np.float64)
    assert (imgs["mean_digit"] == np.clip(np.round(flat.mean(0)), 0, 255).reshape(16, 16, 1)).all()
    from scipy.stats import norm

    # Both Gaussians have pixel p's marginal N(μ_p, σ_p²), clipped to 0..255: its mean is
    # 255·(1 − Φ(β)) + μ(Φ(β) − Φ(α)) + σ(φ(α) − φ(β)), α = −μ/σ, β = (255 − μ)/σ.
    mu, sd = flat.mean(0), flat.std(0)
    live = sd > 0
    a, b = -mu[live] / sd[live], (255 - mu[live]) / sd[live]
    clipped_mean = (255 * norm.sf(b) + mu[live] * (norm.cdf(b) - norm.cdf(a))
                    + sd[live] * (norm.pdf(a) - norm.pdf(b)))  # fmt: skip
    for name in ("pixel_gaussian", "full_gaussian"):
        g = imgs[name].reshape(4000, -1).astype(np.float64)
        assert np.abs(g.mean(0)[live] - clipped_mean).max() < 5 * sd.max() / np.sqrt(4000) + 0.5
        assert (g[:, ~live] == np.round(mu[~live])).all()  # pixels that never vary
    mid = (mu > 60) & (mu < 195)
    assert mid.sum() > 10
    g = imgs["full_gaussian"].reshape(4000, -1).astype(np.float64)
    c_data = np.corrcoef(flat[:, mid], rowvar=False)
    c_gen = np.corrcoef(g[:, mid], rowvar=False)
    assert np.abs(c_gen - c_data).mean() < 0.1  # the full Gaussian keeps pixel correlations
    p = imgs["pixel_gaussian"].reshape(4000, -1).astype(np.float64)
    off = ~np.eye(mid.sum(), dtype=bool)
    assert np.abs(np.corrcoef(p[:, mid], rowvar=False)[off]).mean() < 0.05  # ...this one none

    pixels = lambda b: np.asarray(b, np.float32).reshape(len(b), -1)  # noqa: E731
    out = tb.trivial_baselines(64, ref_split="train[:200]", data_dir=data_dir,
                               feature_fn=pixels, network="pixels")  # fmt: skip
    ref = pixels(np.repeat(load_split("mnist5k", "train[:200]", data_dir=data_dir,
                                      image_size=16), 3, -1)).astype(np.float64)  # fmt: skip
    m = pixels(np.repeat(imgs["mean_digit"][:1], 3, -1))[0].astype(np.float64)
    closed = ((ref.mean(0) - m) ** 2).sum() + np.trace(np.cov(ref, rowvar=False))
    assert out["fid"]["mean_digit"] == pytest.approx(closed, rel=1e-6)
    assert out["fid"]["mean_digit"] > out["fid"]["pixel_gaussian"] > out["fid"]["full_gaussian"]
    assert out["num"] == 64 and out["ref_split"] == "train[:200]"


def test_baselines_are_added_once_per_n_and_a_missing_dataset_leaves_the_record(monkeypatch):
    from experiments import trivial_baselines as tb

    calls = []

    def fake(num, data_dir=None):
        calls.append(num)
        if data_dir == "/nowhere":
            raise FileNotFoundError("no mnist5k under /nowhere")
        return {"num": num, "fid": {"mean_digit": 283.0}}

    monkeypatch.setattr(tb, "trivial_baselines", fake)
    rec = {"runs": {}}
    assert tc.add_baselines(rec, None, fid_samples=128) and rec["baselines"]["num"] == 128
    assert not tc.add_baselines(rec, None, fid_samples=128) and calls == [128]
    assert tc.add_baselines(rec, None, fid_samples=256) and calls == [128, 256]  # new N
    bare = {"runs": {}}
    assert not tc.add_baselines(bare, "/nowhere", fid_samples=128) and "baselines" not in bare


def test_learned_sigma_verdict_needs_divergence_or_a_rising_bound():
    control = _run("eps_L_fixed", 0, [3, 3, 3], health={
        "max_grad_norm": 0.5, "median_grad_norm": 0.1, "loss_spikes": []})  # fmt: skip
    v = lambda r: _verdicts(_record(control, r))["learned"]  # noqa: E731
    steady = _run("eps_L_learned", 0, [3.3, 3.1, 3.05], status="max_steps",
                  health={"max_grad_norm": 2.0, "median_grad_norm": 0.2, "loss_spikes": [4100]})  # fmt: skip
    got = v(steady)
    assert got["verdict"] == "not reproduced"
    assert "max grad norm after 1k steps 2 (median 0.2), 1 loss spikes" in got["evidence"]
    assert "(ε/L fixed Σ seed 0: 0.5, median 0.1, 0 spikes)" in got["evidence"]
    rising = _run("eps_L_learned", 0, [3.3, 3.1, 3.2], status="max_steps")  # +0.1 > s.e. 0.05
    ev = v(rising)["evidence"]
    assert v(rising)["verdict"] == "reproduced"
    assert "3.100 → 3.200 at step 3000 (s.e. 0.050)" in ev and "end bound 3.200 at 3000" in ev
    # Whether the control runs' bounds also went backwards: here the control is flat (0 of 1);
    # a control that rose too is counted.
    assert "other runs whose bound ever rose by more than its s.e.: 0 of 1" in ev
    wobbly = _run("eps_L_fixed", 1, [3, 2.9, 3.0])
    ev = _verdicts(_record(control, wobbly, rising))["learned"]["evidence"]
    assert "other runs whose bound ever rose by more than its s.e.: 1 of 2" in ev
    diverged = dict(steady, status="diverged", final_step=2400, divergence="loss is nan")
    assert v(diverged)["verdict"] == "reproduced" and "step 2400" in v(diverged)["evidence"]


def test_training_health_reads_spikes_and_grad_norms_from_metrics(tmp_path):
    lines = [{"step": 100 * i, "loss": 1.0, "grad_norm": 0.1, "skipped_steps": 0}
             for i in range(1, 31)]  # fmt: skip
    lines[19] = dict(lines[19], loss=5.0, grad_norm=3.0)  # step 2000: a spike (> 3 × median 1.0)
    lines[4] = dict(lines[4], loss=9.0, grad_norm=9.0)  # step 500: before `after`, ignored
    lines.append(dict(lines[24], loss=1.0, grad_norm=0.1))  # step 2500 logged again on resume
    lines[24] = dict(lines[24], loss=7.0)  # ... the first copy was a spike, the later one wins
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("\n".join(json.dumps(m) for m in lines) + "\n")
    h = tc.training_health(str(tmp_path))
    assert h["loss_spikes"] == [2000]
    assert (h["max_grad_norm"], h["max_grad_norm_step"]) == (3.0, 2000)
    assert h["median_grad_norm"] == 0.1 and h["logged_to"] == 3000 and h["skipped_steps"] == 0
    assert tc.bound_rises([{"step": 1, "bpd": 3.0, "bpd_se": 0.05},
                           {"step": 2, "bpd": 3.04, "bpd_se": 0.05},
                           {"step": 3, "bpd": 3.2, "bpd_se": 0.05}]) == [3]  # fmt: skip


def test_plot_only_draws_tabulates_and_keeps_training_health_in_the_record(tmp_path, capsys):
    simple = [_run("eps_simple", s, [3.0, 2.8, b], fids=[40.0]) for s, b in enumerate([2.7, 2.72])]
    rec = _record(*simple)
    out = tmp_path / "out"
    run_dir = out / "runs" / "eps_simple_seed0"
    run_dir.mkdir(parents=True)
    metrics = [{"step": 100 * i, "loss": 1.0, "grad_norm": 0.2} for i in range(1, 31)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics))
    # The end samples of seed 0's last FID point (step 2500), as the evaluator writes them.
    next(p for p in simple[0]["points"] if p["step"] == 2500)["num_gen"] = 4
    (run_dir / "eval").mkdir()
    digits = np.zeros((4, 16, 16, 1), np.uint8)
    np.savez(run_dir / "eval" / "samples_step_00002500_n4_full1000.npz", images=digits)
    path, fig = tmp_path / "record.json", tmp_path / "curves.png"
    path.write_text(json.dumps(rec))
    tc.main(["--plot_only", "--record", str(path), "--figure", str(fig), "--out", str(out),
             "--no-baselines"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "| eps_simple | 2 | 3000 | converged@3000 | 2.710 ± 0.014" in printed
    assert "| NLL: ε/L (fixed Σ) has a better bound than ε/L_simple | **not resolved" in printed
    saved = json.loads(path.read_text())["runs"]
    assert saved["eps_simple_seed0"]["health"]["median_grad_norm"] == 0.2
    assert "health" not in saved["eps_simple_seed1"]  # no folder for it
    assert os.path.getsize(fig) > 10_000
    assert f"samples: {tmp_path / 'curves_samples.png'}" in printed
    assert os.path.getsize(tmp_path / "curves_samples.png") > 1_000


def test_a_run_the_rule_stopped_is_continued_as_a_copy_and_reported_apart(tmp_path, monkeypatch):
    """The extension stage: a converged run is copied and trained on to max_steps; its own entry
    (the rule's end point, used by the table and the verdicts) is left as it was."""
    from types import SimpleNamespace

    from diffusion import evaluate, training

    trained = []

    def fake_train(config, workdir):
        step = config.training.num_train_steps
        trained.append((os.path.basename(workdir), step))
        with open(os.path.join(workdir, "last_step"), "w") as f:
            f.write(str(step))  # stands in for the checkpoint a copy must carry
        return SimpleNamespace(step=step)

    def fake_eval(config, workdir, mode, **kw):
        step = config.training.num_train_steps
        assert open(os.path.join(workdir, "last_step")).read() == str(step)
        bpd = max(2.9, 3.1 - 0.1 * step)  # flat from step 2: the rule stops at step 4
        res = {"bpd": {"total": bpd, "total_se": 0.05}} if config.eval.bpd_num_examples else {}
        if config.eval.num_samples:
            res["fid"] = {"value": 100.0 / step, "real_floor": {"fid": 1.0}, "num_gen": 8}
        return {step: res}

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(evaluate, "run", fake_eval)
    plan = dict(PLAN, max_steps=6, bound_every=1, fid_every=3)
    rec_path = str(tmp_path / "record.json")
    kw = dict(stage1_rows=["eps_simple"], stage1_seeds=[0, 1], stage2_rows=[])
    record = tc.run_plan(str(tmp_path), rec_path, plan, extend_rows=["eps_simple"],
                         extend_seeds=[0], **kw)  # fmt: skip
    runs = record["runs"]
    assert set(runs) == {"eps_simple_seed0", "eps_simple_seed1", "eps_simple_seed0_ext"}
    base, ext = runs["eps_simple_seed0"], runs["eps_simple_seed0_ext"]
    assert (base["status"], base["final_step"]) == ("converged", 4)
    assert [p["step"] for p in base["points"]] == [1, 2, 3, 4]
    assert base["points"][-1]["fid"] == 25.0  # the FID added where the rule stopped it
    assert (ext["status"], ext["final_step"]) == ("max_steps", 6)
    assert ext["extension_of"] == "eps_simple_seed0"
    assert [p["step"] for p in ext["points"]] == [1, 2, 3, 4, 5, 6]
    # Only steps 5 and 6 were trained for the extension, in its own folder, from the copy.
    assert [s for n, s in trained if n == "eps_simple_seed0_ext"] == [5, 6]
    assert os.path.isfile(tmp_path / "runs" / "eps_simple_seed0_ext" / "curve.json")
    table = tc.markdown_table(record)
    assert "| eps_simple | 2 | 4 | converged@4 | 2.900 ± 0.000" in table
    assert "- eps_simple seed 0, from step 4 to 6 (max_steps): bound 2.900 ± 0.050 at 6" in table
    # A relaunch trains nothing more.
    trained.clear()
    tc.run_plan(str(tmp_path), rec_path, plan, extend_rows=["eps_simple"], extend_seeds=[0], **kw)
    assert trained == []
    tc.plot_curves(record, str(tmp_path / "c.png"))


def test_an_nll_ordering_that_reverses_in_the_extensions_is_not_resolved():
    simple = [_run("eps_simple", s, [3.0, 2.8, b]) for s, b in enumerate([2.70, 2.72, 2.74])]
    high = [_run("eps_L_fixed", s, [3.2, 3.0, b]) for s, b in enumerate([2.90, 2.92, 2.94])]

    def ext(row, bounds):
        return dict(_run(row, 0, bounds, status="max_steps"), extension_of=f"{row}_seed0")

    flipped = _record(*simple, *high)
    flipped["runs"]["eps_simple_seed0_ext"] = ext("eps_simple", [3.0, 2.8, 2.7, 2.69, 2.68])
    flipped["runs"]["eps_L_fixed_seed0_ext"] = ext("eps_L_fixed", [3.2, 3.0, 2.9, 2.6, 2.4])
    v = _verdicts(flipped)["NLL"]
    assert v["verdict"] == "not resolved at this budget"
    assert "to step 5000: 2.400 vs 2.680, L − L_simple = -0.280 ± 0.071" in v["evidence"]
    assert "(the ordering reverses with training)" in v["evidence"]
    held = _record(*simple, *high)
    held["runs"]["eps_simple_seed0_ext"] = ext("eps_simple", [3.0, 2.8, 2.7, 2.69, 2.68])
    held["runs"]["eps_L_fixed_seed0_ext"] = ext("eps_L_fixed", [3.2, 3.0, 2.9, 2.85, 2.8])
    v = _verdicts(held)["NLL"]
    assert v["verdict"] == "not reproduced" and "L − L_simple = +0.120 ± 0.071" in v["evidence"]
    # Extensions stay out of the seed statistics: the end point is still the rule's.
    assert "ε/L fixed Σ 2.920 ± 0.020 (n=3" in v["evidence"]


def test_wall_time_counts_the_points_an_extension_copied_once():
    """An extension starts as a copy of its run's points (steps 1k–3k here): the wall time sums
    them once, plus the extension's own later points."""
    base = _run("eps_simple", 0, [3.0, 2.9, 2.8])
    for p in base["points"]:
        p.update(train_s=100.0, eval_s=10.0)
    ext = _run("eps_simple", 0, [3.0, 2.9, 2.8, 2.75, 2.7], status="max_steps")
    for p in ext["points"]:
        p.update(train_s=100.0, eval_s=10.0)
    ext["extension_of"] = "eps_simple_seed0"
    rec = {"runs": {"eps_simple_seed0": base, "eps_simple_seed0_ext": ext}}
    assert tc.wall_seconds(rec) == {"train_s": 500.0, "eval_s": 50.0}
