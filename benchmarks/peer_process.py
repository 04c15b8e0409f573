"""The peer (``benchmarks.peer_diffusers``) in its own process, driven step by step from
``benchmarks.run``.

Why: with torch and JAX in one process, the two runtimes' worker threads (torch's OpenMP team,
XLA's Eigen pool) share 2 cores and one heap; on 2026-12-02 our batch-32 step took 13.2–14.9 s
when it alternated with the peer's in one process against 8.1–9.0 s alone, minutes apart on the
same idle host. Here the peer lives in a child process that blocks on a pipe between commands,
so neither side's threads or allocator state are present while the other one runs; the steps
still alternate round by round, so both sides see the same host speed.

    proxy = PeerProcess(threads=2)         # spawns ``python -m benchmarks.peer_process --serve``
    trainer = proxy.PeerTrainer(8)         # same interface as peer_diffusers.PeerTrainer
    seconds = trainer.run()                # one timed step, measured inside the child
    proxy.close()

The child reports times measured with ``time.perf_counter`` around the step itself, so the pipe
round trip is not counted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeerProcessError(RuntimeError):
    """The peer child failed (its last stderr lines are in the message)."""


class _Remote:
    """A proxy for one object living in the child; attribute reads come from its last reply."""

    def __init__(self, proc: "PeerProcess", handle: int, attrs: Dict[str, Any]):
        self._proc, self._handle = proc, handle
        self.__dict__.update(attrs)

    def _call(self, method: str) -> float:
        reply = self._proc._request({"op": "call", "handle": self._handle, "method": method})
        self.__dict__.update(reply.get("attrs", {}))
        return float(reply["value"])


class RemoteTrainer(_Remote):
    def run(self) -> float:
        """One timed train step in the child (seconds)."""
        return self._call("run")


class RemoteSampler(_Remote):
    def run_chain(self) -> float:
        """One timed sampling chain in the child (seconds)."""
        return self._call("run_chain")

    def run_forward(self) -> float:
        """One timed bare forward in the child (seconds)."""
        return self._call("run_forward")


class PeerProcess:
    """The peer module's interface (``PeerTrainer``, ``PeerSampler``, ``EXPECTED_PARAMS``,
    ``UNET_KWARGS``) served by a child process. Raises `PeerProcessError` (with the child's
    message, e.g. torch not installed) if the child cannot start."""

    def __init__(self, threads: int, python: Optional[str] = None):
        self._p = subprocess.Popen(
            [python or sys.executable, "-m", "benchmarks.peer_process", "--serve"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        hello = self._request({"op": "hello", "threads": int(threads)})
        self.EXPECTED_PARAMS = hello["expected_params"]
        self.UNET_KWARGS = hello["unet_kwargs"]
        self.torch_version = hello["torch"]
        self.pid = self._p.pid

    def _request(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        if self._p.poll() is not None:
            raise PeerProcessError(f"peer process exited ({self._p.returncode}): {self._stderr()}")
        self._p.stdin.write(json.dumps(msg) + "\n")
        self._p.stdin.flush()
        while True:
            line = self._p.stdout.readline()
            if not line:
                self._p.wait()
                raise PeerProcessError(
                    f"peer process exited ({self._p.returncode}) during {msg['op']}: "
                    f"{self._stderr()}"
                )
            if line.startswith("PEER "):  # anything else is a library's chatter on stdout
                break
        reply = json.loads(line[len("PEER ") :])
        if "error" in reply:
            raise PeerProcessError(reply["error"])
        return reply

    def _stderr(self) -> str:
        try:
            tail = self._p.stderr.read().strip().splitlines()[-5:]
        except (OSError, ValueError):
            tail = []
        return " / ".join(tail) or "(no stderr)"

    def PeerTrainer(self, batch_size: int) -> RemoteTrainer:  # noqa: N802 (mirrors the class)
        r = self._request({"op": "new", "kind": "trainer", "args": [int(batch_size)]})
        return RemoteTrainer(self, r["handle"], r["attrs"])

    def PeerSampler(self, batch_size: int, steps: int) -> RemoteSampler:  # noqa: N802
        r = self._request({"op": "new", "kind": "sampler", "args": [int(batch_size), int(steps)]})
        return RemoteSampler(self, r["handle"], r["attrs"])

    def drop(self, remote: _Remote) -> None:
        """Frees the child's object behind ``remote`` (its model, optimiser, buffers)."""
        self._request({"op": "drop", "handle": remote._handle})

    def close(self) -> None:
        if self._p.poll() is None:
            try:
                self._p.stdin.close()
                self._p.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._p.kill()


_ATTRS = {
    "trainer": ("n_params", "adam_impl", "last_loss", "batch_size"),
    "sampler": ("steps",),
}


def serve() -> int:
    """The child: reads one JSON command per line on stdin, answers ``PEER {json}`` on stdout."""
    objects: Dict[int, Any] = {}  # handle -> (kind, object)
    handles = itertools.count(1)
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not interleave with replies

    def reply(obj: Dict[str, Any]) -> None:
        out.write("PEER " + json.dumps(obj) + "\n")
        out.flush()

    peer = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "hello":
                from benchmarks import peer_diffusers as peer  # noqa: PLC0415 (torch: child only)

                peer.set_threads(msg["threads"])
                import torch  # noqa: PLC0415

                reply(
                    {
                        "expected_params": peer.EXPECTED_PARAMS,
                        "unet_kwargs": peer.UNET_KWARGS,
                        "torch": torch.__version__,
                    }
                )
            elif msg["op"] == "new":
                cls = {"trainer": peer.PeerTrainer, "sampler": peer.PeerSampler}[msg["kind"]]
                obj = cls(*msg["args"])
                handle = next(handles)
                objects[handle] = (msg["kind"], obj)
                attrs = {a: getattr(obj, a) for a in _ATTRS[msg["kind"]]}
                reply({"handle": handle, "attrs": attrs})
            elif msg["op"] == "call":
                kind, obj = objects[msg["handle"]]
                value = getattr(obj, msg["method"])()
                reply({"value": value, "attrs": {a: getattr(obj, a) for a in _ATTRS[kind]}})
            elif msg["op"] == "drop":
                objects.pop(msg["handle"], None)
                import gc  # noqa: PLC0415

                gc.collect()
                reply({"ok": True})
            else:
                reply({"error": f"unknown op {msg['op']!r}"})
        except Exception as e:  # noqa: BLE001  (sent to the parent, which raises it)
            reply({"error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", action="store_true", help="run as the child (stdin/stdout JSON)")
    if not ap.parse_args().serve:
        ap.error("this module is started by benchmarks.run (use --serve only for that)")
    sys.exit(serve())
