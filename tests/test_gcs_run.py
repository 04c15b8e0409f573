"""The whole tiny run on a ``gs://`` workdir served by a local GCS emulator (127.0.0.1 only):
train, checkpoint, resume, sample, evaluate, and the quarantine of a damaged checkpoint.

The README's TPU-pod command puts the workdir on ``gs://``; this runs the real code against a
real GCS API (gcp-storage-emulator) with the client libraries pointed at it: Orbax's arrays go
through TensorStore, every other file through `diffusion.io` (etils.epath → fsspec/gcsfs).
Two things stay local, because TensorFlow's own GCS client cannot be pointed at an emulator:
the TFDS data_dir (tf.data reads TFRecords through it) and TensorBoard event files
(``config.training.tensorboard=False`` here; on real GCS they work through TensorFlow).
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from gcs_emulator import (  # noqa: F401
    _http,
    gcs_emulator,
    requires_emulator,
    run_python,
    start_emulator,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: A dead bucket must end a run within this many seconds (issue 32): each storage client gives
#: up after ~35 s of retries, a failed save's clean-up is skipped when the store does not answer,
#: and closing after an error waits at most Checkpointer.close_timeout_s (30 s).
DEAD_BUCKET_BOUND_S = 150

_RUN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    import numpy as np
    from diffusion import evaluate, io, training
    from train_worker import small_config
    wd, data_dir = os.environ["WORKDIR"], os.environ["DATA_DIR"]

    def config(steps):
        c = small_config(data_dir, steps)
        c.training.log_every = 2
        c.training.checkpoint_every = 2
        c.training.keep_every = 4
        c.training.sample_every = 4
        c.training.num_grid_samples = 4
        c.training.grid_sample.num_steps = 3
        c.training.tensorboard = False
        c.eval.num_samples = 8
        c.eval.batch_size = 8
        c.sample.num_steps = 3
        c.eval.fid_split = "test[:16]"
        c.eval.bpd_num_examples = 4
        c.eval.real_floor_split = "train[:8]"
        return c

    out = {}
    s = training.train(config(4), wd)                      # train, checkpoint
    out["first"] = int(np.asarray(s.step))
    s = training.train(config(6), wd)                      # relaunch: resume at 4
    out["resumed"] = int(np.asarray(s.step))
    out["metrics_steps"] = [r["step"] for r in io.read_jsonl(io.join(wd, "metrics.jsonl"))]

    def fake_features(images):   # [B, 16, 16, 3] -> [B, 48]: cheap, deterministic
        x = np.asarray(images, np.float32) / 255.0
        b, h, w, _ = x.shape
        return x.reshape(b, 4, h // 4, 4, w // 4, 3).mean((2, 4)).reshape(b, -1)

    c = config(6)
    out["sample"] = evaluate.run(c, wd, mode="sample")
    res = evaluate.run(c, wd, mode="evaluate", feature_fn=fake_features, feature_network="fake")
    e = res[6]
    out["fid"], out["bpd"] = e["fid"]["value"], e["bpd"]["total"]
    out["floor"] = e["fid"]["real_floor"]["fid"]
    # Damage the newest checkpoint: a relaunch quarantines it on the bucket and resumes from 4.
    from diffusion.checkpoint import Checkpointer
    ck = io.join(wd, "checkpoints")
    for name in io.listdir(io.join(ck, "6", "state")):
        p = io.join(ck, "6", "state", name)
        if io.isfile(p) and name.startswith("_METADATA"):
            io.write_bytes(p, io.read_bytes(p)[:20])
    s = training.train(config(6), wd)
    out["after_quarantine"] = int(np.asarray(s.step))
    out["quarantined"] = Checkpointer(ck).quarantined()
    print("RESULT " + json.dumps(out))
""")


def _objects(emu, prefix=""):
    _, body = _http("GET", f"{emu.endpoint}/storage/v1/b/{emu.bucket}/o?prefix={prefix}")
    return sorted(i["name"] for i in json.loads(body).get("items", []))


@pytest.mark.slow
@requires_emulator
def test_tiny_run_train_resume_sample_evaluate_on_a_gcs_workdir(gcs_emulator, tmp_path, data_dir):
    emu = gcs_emulator
    wd = emu.url("run")
    p = run_python(
        _RUN,
        {**emu.env, "WORKDIR": wd, "DATA_DIR": data_dir},
        timeout=900,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT ") :])
    assert r["first"] == 4 and r["resumed"] == 6
    assert r["metrics_steps"] == [2, 4, 6]  # appended across the relaunch
    assert r["sample"] == {"6": f"{wd}/eval/samples_step_00000006.png"}
    assert r["fid"] > 0 and r["bpd"] > 0 and r["floor"] > 0
    assert r["after_quarantine"] == 6  # resumed from 4, trained 5 and 6 again
    assert len(r["quarantined"]) == 1 and r["quarantined"][0].startswith("6-")
    objs = _objects(emu, "run/")
    print("objects written to the bucket:\n  " + "\n  ".join(objs))
    for want in (
        "run/config.json",
        "run/metrics.jsonl",
        "run/samples/step_00000004.png",
        "run/eval/results.json",
        "run/eval/real_floor.json",
        "run/eval/samples_step_00000006.png",
        "run/eval/samples_step_00000006.npz",
    ):
        assert want in objs, want
    for prefix in (
        "run/checkpoints/4/state/",
        "run/checkpoints/6/state/",
        "run/checkpoints_corrupt/6-",
        "run/eval/features_step_00000006_",
        "run/eval/samples_step_00000006_n8_",
    ):
        assert any(o.startswith(prefix) for o in objs), prefix
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(str(tmp_path), "gs:"))


def _launch_cmd(workdir, data_dir, steps):
    return [
        sys.executable,
        os.path.join(ROOT, "launch.py"),
        "--config",
        "experiments/tiny.py",
        "--workdir",
        workdir,
        f"--config.data.data_dir={data_dir}",
        f"--config.training.num_train_steps={steps}",
        "--config.training.checkpoint_every=2",
        "--config.training.keep_every=1000",
        "--config.training.sample_every=1000",
        "--config.training.log_every=1",
        "--config.training.tensorboard=False",
        "--mode",
        "train",
    ]


@pytest.mark.slow
@requires_emulator
def test_a_dead_bucket_ends_the_run_in_bounded_time_and_the_last_good_step_resumes(
    tmp_path, data_dir
):
    """Issue 32: the storage server is killed mid-run. Before the fix the process hung forever
    (0 % CPU, SIGTERM ignored) in the checkpointer's close, waiting on the save to the dead
    bucket. Now it exits 2 within DEAD_BUCKET_BOUND_S with one line naming the bucket, the
    operation and the last good step; that step's checkpoint, served again by a restarted
    server on the same folder, resumes."""
    root = str(tmp_path / "gcs")
    os.makedirs(root)
    with start_emulator(filesystem_root=root) as emu:
        port = int(emu.endpoint.rsplit(":", 1)[1])
        wd = emu.url("dead")
        p = subprocess.Popen(
            _launch_cmd(wd, data_dir, 400),
            env=emu.env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and p.poll() is None:
                done = [o for o in _objects(emu, "dead/checkpoints/") if "commit_success" in o]
                if any(o.startswith("dead/checkpoints/4/") for o in done):
                    break  # two complete checkpoints on the bucket: kill the server now
                time.sleep(0.5)
            assert p.poll() is None, p.stdout.read()[-3000:]
            os.kill(emu.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            out, _ = p.communicate(timeout=DEAD_BUCKET_BOUND_S + 120)
            took = time.monotonic() - t_kill
        finally:
            if p.poll() is None:
                p.kill()
    last = out.strip().splitlines()[-1]
    print(f"exit {p.returncode} {took:.1f} s after the server was killed:\n{last}")
    assert p.returncode == 2, out[-4000:]
    assert took < DEAD_BUCKET_BOUND_S
    assert last.startswith("error: ") and "storage unavailable" in last
    assert f"gs://{emu.bucket}/dead" in last
    good = re.search(r"last good checkpoint(?:, step| is step) (\d+)", last)
    assert good, last
    good = int(good.group(1))
    assert good >= 4
    # The bucket comes back (same folder, same port): the same command resumes from that step.
    with start_emulator(filesystem_root=root, port=port) as emu2:
        r = subprocess.run(
            _launch_cmd(wd, data_dir, good + 1),
            env=emu2.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"Resumed from step {good} " in r.stderr


_CONVERT = textwrap.dedent("""
    import importlib.util, json, os, sys
    import numpy as np
    from diffusion import convert, evaluate, io, parallel
    from diffusion.checkpoint import Checkpointer
    from diffusion.factories import create_model
    wd, fixture = os.environ["WORKDIR"], os.environ["FIXTURE"]
    rc = convert.main(["--input", fixture, "--workdir", wd, "--base", "emoji32"])
    assert rc == 0, rc
    # The workdir's config.py, copied out of the bucket and run locally, finds config.json in
    # the bucket (launch.py --config takes a local file).
    io.write_text("config.py", io.read_text(io.join(wd, "config.py")))
    spec = importlib.util.spec_from_file_location("converted_cfg", "config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    model, mesh = create_model(config), parallel.make_mesh()
    ckpt = Checkpointer(io.join(wd, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    ema = evaluate.restore_ema_params(ckpt, step, config, model, mesh)
    ckpt.close()
    ref = np.load(os.path.join(fixture, "reference_outputs.npz"))
    out = np.asarray(model.apply({"params": ema}, ref["x"], ref["t"], train=False))
    err = float(np.abs(out - ref["eps"]).max() / np.abs(ref["eps"]).max())
    print("RESULT " + json.dumps({"step": step, "err": err, "ch": config.model.ch}))
""")


@pytest.mark.slow
@requires_emulator
def test_convert_into_a_gcs_workdir(gcs_emulator, tmp_path):
    """``python -m diffusion.convert --workdir gs://...`` writes config.json, config.py, the
    report and the checkpoint into the bucket (nothing local named ``gs:``), and the workdir
    restores: the EMA weights read back from the bucket reproduce diffusers' outputs."""
    emu = gcs_emulator
    wd = emu.url("converted")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fixture = os.path.join(root, "tests", "fixtures", "diffusers_tiny")
    p = run_python(
        _CONVERT, {**emu.env, "WORKDIR": wd, "FIXTURE": fixture}, timeout=300, cwd=str(tmp_path)
    )
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT ") :])
    assert r["step"] == 0 and r["ch"] == 32 and r["err"] < 1e-5, r
    assert f"gcloud storage cp {wd}/config.py config.py" in p.stdout, p.stdout
    assert f"--config config.py --workdir {wd} --mode sample" in p.stdout, p.stdout
    objs = _objects(emu, "converted/")
    for want in ("converted/config.json", "converted/config.py", "converted/convert_report.json"):
        assert want in objs, (want, objs)
    assert any(o.startswith("converted/checkpoints/0/state/") for o in objs), objs
    assert not os.path.exists(os.path.join(str(tmp_path), "gs:")), os.listdir(str(tmp_path))
    assert not os.path.exists(os.path.join(root, "gs:"))
