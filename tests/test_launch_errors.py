"""launch.py's errors: bad command lines end in one line on stderr, exit status 2, before
anything heavy starts; every failure of a run ends as one classified message (issue 32)."""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=60):
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return p.returncode, p.stderr.strip().splitlines(), time.monotonic() - t0


def test_an_unknown_config_field_is_one_line_with_the_suggestion(tmp_path):
    """Before: a 53-line ml_collections traceback ending in the suggestion."""
    rc, lines, took = _launch(
        "--config", "experiments/tiny.py", "--workdir", str(tmp_path),
        "--config.training.batchsize=8",
    )  # fmt: skip
    assert rc == 2
    assert lines == [
        "error: --config.training.batchsize=8: unknown config field 'batchsize'; did you mean "
        "'batch_size'? The fields are listed in experiments/default.py."
    ]
    print(f"reported in {took:.1f} s")


def test_an_unknown_config_section_names_the_flag(tmp_path):
    rc, lines, _ = _launch(
        "--config=experiments/tiny.py", "--workdir", str(tmp_path),
        "--config.trainin.lr=0.1",
    )  # fmt: skip
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith("error: --config.trainin.lr=0.1: unknown config field 'trainin'")
    assert "did you mean 'training'?" in lines[0]


def test_a_missing_config_file_is_named_at_once(tmp_path):
    """Before: "Failed loading config file config_config" after JAX and TensorFlow started."""
    rc, lines, took = _launch("--config", "experiments/nope.py", "--workdir", str(tmp_path))
    assert rc == 2
    assert len(lines) == 1 and "--config 'experiments/nope.py': no such file" in lines[0]
    assert took < 20  # nothing heavy was imported (a few seconds on a slow day)


def test_a_config_file_that_does_not_load_is_named_with_its_error(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    rc, lines, _ = _launch("--config", str(bad), "--workdir", str(tmp_path / "wd"))
    assert rc == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: --config {str(bad)!r} could not be loaded (line 1)")
    assert "SyntaxError" in lines[0]


@pytest.fixture(scope="module")
def launch_module():
    sys.path.insert(0, ROOT)
    try:
        import launch
    finally:
        sys.path.remove(ROOT)
    return launch


@pytest.mark.parametrize(
    "text, kind, fix",
    [
        (
            'RESOURCE_EXHAUSTED: Error writing "a/0": Failed to write 741376 bytes to file 6: No '
            "space left on device [os_error_code='28']",
            "no space left",
            "free space",
        ),
        ('PERMISSION_DENIED: Error writing "a/0": HTTP response code: 403', "permission denied",
         "grant the credentials"),
        ('NOT_FOUND: Error reading "gs://b/x/manifest.ocdbt"', "not found",
         "check that the workdir"),
        ("UNAVAILABLE: Error writing to gs://b/x: Connection refused", "storage unavailable",
         "check the network"),
    ],
)  # fmt: skip
def test_tensorstore_errors_are_classified_with_the_fix(launch_module, text, kind, fix):
    """TensorStore reports I/O failures as ValueError with an absl status code; before, they
    slipped past launch.py's list of handled errors as a raw traceback."""
    message, status = launch_module.error_message(ValueError(text))
    assert status == 2
    assert message.startswith(f"storage: {kind} (ValueError: ")
    assert f"Fix: {fix}" in message and "\n" not in message


def test_an_unknown_error_is_one_line_and_its_traceback_is_kept(launch_module):
    try:
        raise RuntimeError("disk on fire\nsecond line")
    except RuntimeError as e:
        message, status = launch_module.error_message(e)
    assert status == 1
    assert message.startswith("RuntimeError: disk on fire second line (traceback in ")
    path = message.rsplit("traceback in ", 1)[1].rstrip(")")
    with open(path) as f:
        assert "raise RuntimeError" in f.read()
    os.remove(path)


def test_the_projects_own_errors_keep_their_message(launch_module):
    from diffusion.checkpoint import CheckpointSaveError, NoRestorableCheckpointError
    from diffusion.config_check import ConfigError

    for e in (
        CheckpointSaveError("Could not save the checkpoint at step 4 (...)"),
        NoRestorableCheckpointError("None of the checkpoints ..."),
        ConfigError("Invalid config (1 problem): ..."),
    ):
        assert launch_module.error_message(e) == (str(e), 2)
