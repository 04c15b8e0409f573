"""The offline reproduction entry point (experiments/reproduce.py): a real (tiny) run of two rows,
a learned-Σ one included, writes the table, JSON and figures; a relaunch skips finished runs; a
diverging row is reported as diverged with its last good checkpoint evaluated."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import reproduce

# Small enough for CI: T = 100, 12 steps, 8 samples, 4 bound examples.
TINY = {
    "diffusion.num_timesteps": 100,
    "diffusion.beta_end": 0.2,
    "training.num_train_steps": 12,
    "training.warmup_steps": 2,
    "training.log_every": 4,
    "training.checkpoint_every": 6,
    "training.keep_every": 12,
    "training.sample_every": 12,
    "training.num_grid_samples": 4,
    "training.grid_sample.num_steps": 5,
    "eval.num_samples": 8,
    "eval.batch_size": 8,
    "eval.bpd_num_examples": 4,
    "eval.fid_split": "train[:16]",
}


def fake_features(images):
    """[B, H, W, 3] uint8 -> [B, 12]: mean intensity over a 2×2 grid per channel (not Inception)."""
    x = images.astype(np.float32) / 255.0
    b, h, w, c = x.shape
    return x.reshape(b, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4)).reshape(b, -1)


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory, data_dir):
    out = str(tmp_path_factory.mktemp("repro"))
    runs = [("eps_simple", 0), ("xprev_L_learned", 0)]
    first = reproduce.reproduce(
        runs, out, TINY, data_dir=data_dir, feature_fn=fake_features, feature_network="fake"
    )
    second = reproduce.reproduce(
        runs,
        out,
        TINY,
        data_dir=data_dir,
        feature_fn=fake_features,
        feature_network="fake",
        figures=False,
    )
    return out, first, second


@pytest.mark.slow
def test_runs_are_trained_evaluated_and_tabled(two_rows):
    out, first, _ = two_rows
    assert [r["run"] for r in first["runs"]] == ["eps_simple_seed0", "xprev_L_learned_seed0"]
    for r in first["runs"]:
        assert r["evaluated_step"] == 12 and not r["diverged"]
        assert r["fid"]["num_gen"] == 8 and r["fid"]["num_ref"] == 16 and r["fid"]["value"] > 0
        assert np.isfinite(r["kid"]["mean"])
        # the bound in bits/dim: positive, and its Table 4 split adds up
        b = r["bpd"]
        assert b["num_examples"] == 4 and b["total"] > 0
        assert b["rate"] + b["distortion"] == pytest.approx(b["total"], rel=1e-6)
        assert len(b["terms_bpd"]) == 100
    learned = first["runs"][1]
    assert (learned["mean_type"], learned["loss_type"], learned["var_type"]) == (
        "xprev",
        "kl",
        "learned",
    )
    table = open(os.path.join(out, "table.md")).read()
    assert "| eps_simple_seed0 | ε, L_simple, fixed Σ | 12 | no |" in table
    assert "9.46 / 3.17" in table and "7.28 / 23.69" in table
    on_disk = json.load(open(os.path.join(out, "results.json")))
    assert on_disk["runs"][0]["fid"]["value"] == first["runs"][0]["fid"]["value"]


@pytest.mark.slow
def test_figures_are_written(two_rows):
    out, first, _ = two_rows
    assert first["figures"]["from_run"] == "eps_simple_seed0"
    for name in (
        "rate_distortion.png",
        "progressive.png",
        "interpolation.png",
        "samples_eps_simple_seed0.png",
        "samples_xprev_L_learned_seed0.png",
    ):
        with Image.open(os.path.join(out, name)) as im:
            assert im.width > 50 and im.height > 50, name
    # progressive: 8 chains × 10 x̂0 columns of 16×16 digits (3× upscaled, 2px borders)
    with Image.open(os.path.join(out, "progressive.png")) as im:
        assert im.size == (3 * (10 * 18 + 2), 3 * (8 * 18 + 2))
    # interpolation: 3 t values × 3 pairs, each row (source, 9 λ, source)
    with Image.open(os.path.join(out, "interpolation.png")) as im:
        assert im.size == (3 * (11 * 18 + 2), 3 * (9 * 18 + 2))
    rd = first["figures"]["rate_distortion"]
    assert rd["rate"] > 0 and rd["distortion"] > 0


@pytest.mark.slow
def test_relaunch_skips_finished_runs(two_rows):
    _, first, second = two_rows
    assert all(r.get("skipped") for r in second["runs"])
    assert [r["fid"] for r in second["runs"]] == [r["fid"] for r in first["runs"]]
    assert second["seconds_this_invocation"] < 30


@pytest.mark.slow
def test_a_diverging_row_is_reported_and_its_last_good_checkpoint_evaluated(tmp_path, data_dir):
    # lr = 1e4 blows the parameters up within a few steps
    over = dict(
        TINY,
        **{
            "training.lr": 1e4,
            "training.warmup_steps": 0,
            "training.checkpoint_every": 1,
            "training.log_every": 1,
            "eval.bpd_num_examples": 0,
        },
    )
    res = reproduce.reproduce(
        [("eps_simple", 3)],
        str(tmp_path),
        over,
        data_dir=data_dir,
        feature_fn=fake_features,
        feature_network="fake",
        figures=False,
    )
    r = res["runs"][0]
    assert r["diverged"] and "Non-finite" in r["divergence"]
    assert r["evaluated_step"] is not None and r["evaluated_step"] < 12
    assert "**yes**" in open(tmp_path / "table.md").read()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="valid rows"):
        reproduce.parse_runs("eps_simpel@0")
    with pytest.raises(ValueError, match="ROW@SEED"):
        reproduce.parse_runs("eps_simple@x")
    assert reproduce.parse_runs("paper") == [(r, 0) for r in reproduce.ablation.PAPER_ROWS] + [
        ("eps_simple", 1),
        ("eps_L_fixed", 1),
    ]
    with pytest.raises(ValueError, match="no such config field"):
        reproduce.run_config("eps_simple", 0, {"training.nope": 1})
    assert reproduce.parse_overrides(["training.lr=2e-4", "model.ch_mult=(1,2)"]) == {
        "training.lr": 2e-4,
        "model.ch_mult": (1, 2),
    }


def test_overrides_reach_nested_fields_and_old_summaries_map_removed_ones():
    c = reproduce.run_config(
        "eps_simple", 0, {"training.grid_sample.num_steps": 5, "sample.heun.rho": 5.0}
    )
    assert c.training.grid_sample.num_steps == 5 and c.sample.heun.rho == 5.0
    # A summary written before config.sample.num_steps existed still rebuilds its config.
    old = reproduce.run_config(
        "eps_simple", 0, {"eval.sample_steps": 3, "training.grid_sample_steps": 7}
    )
    assert old.sample.num_steps == 3 and old.training.grid_sample.num_steps == 7
    assert old.eval.sample_steps is None and old.training.grid_sample_steps is None
