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
import textwrap

from gcs_emulator import _http, gcs_emulator, requires_emulator, run_python  # noqa: F401

_RUN = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
    import numpy as np
    from diffusion import evaluate, io, train
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
    s = train.train_and_evaluate(config(4), wd)                      # train, checkpoint
    out["first"] = int(np.asarray(s.step))
    s = train.train_and_evaluate(config(6), wd)                      # relaunch: resume at 4
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
    s = train.train_and_evaluate(config(6), wd)
    out["after_quarantine"] = int(np.asarray(s.step))
    out["quarantined"] = Checkpointer(ck).quarantined()
    print("RESULT " + json.dumps(out))
""")


def _objects(emu, prefix=""):
    _, body = _http("GET", f"{emu.endpoint}/storage/v1/b/{emu.bucket}/o?prefix={prefix}")
    return sorted(i["name"] for i in json.loads(body).get("items", []))


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
