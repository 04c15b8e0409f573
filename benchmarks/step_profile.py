"""Where the train step's time goes, op by op: a `jax.profiler` trace of the real CIFAR10 train
step, its per-op durations summed by kind, beside the peer's (a profile aid, not a test).

Ours: runs ``--steps`` steps of ``benchmarks.ours_jax.TrainBench`` (the project's compiled step)
after one warm-up step under ``jax.profiler.trace``, reads the Perfetto trace it writes, and sums
the duration of every XLA CPU op by kind. Op names are matched to the optimized HLO of the same
compiled step, so a fusion is classified by what it holds: ``conv 3x3`` (forward and
backward-input convolutions, 3×3 window), ``conv wgrad`` (backward-filter convolutions: XLA
writes them as a convolution whose window is the whole image), ``dot``, ``transpose``, ``copy``,
``reduce`` (GroupNorm statistics, loss), ``elementwise fusion`` (the rest: swish, adds, scaling,
Adam, EMA). Convolution FLOPs are counted from the HLO shapes, so each conv kind also gets GFLOP/s.

Peer (``--peer``, needs torch and diffusers): the same for `benchmarks.peer_diffusers.PeerTrainer`
under `torch.profiler`, by the self CPU time of each aten op.

Op durations are wall time of each op; XLA may run two ops at once on the two cores, so the sums
can exceed the step's wall time (the "CPUs busy" figure).

    python -m benchmarks.step_profile --batch 8 --steps 2 --peer
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

#: The first of these found among a fusion's opcodes names the fusion (after convolutions).
KINDS = ("dot", "transpose", "copy", "reduce", "scatter", "gather")


def _dims(text: str):
    return [int(v) for v in text.split(",")] if text else []


def _computations(hlo_text: str) -> dict:
    """Name -> instruction lines of every computation in an HLO module's text."""
    comps, name = {}, None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    return comps


def conv_kind_and_flops(body: list) -> tuple:
    """``(kind, flops)`` of the convolution in a fused computation's lines, or ``None``.

    FLOPs = 2 · |output| · |rhs| / rhs_output_features: every output element contracts over the
    kernel's window × input features. This holds for all three convolutions of a layer, including
    the backward-filter one whose "kernel" is the output gradient [B, H, W, C_out] (batch as input
    features, the image as window).
    """
    shapes = {}
    for ln in body:
        m = re.match(r"\s*%([\w.\-]+) = f32\[([\d,]*)\]", ln)
        if m:
            shapes[m.group(1)] = _dims(m.group(2))
    for ln in body:
        if " convolution(" not in ln:
            continue
        out = _dims(re.search(r"= \w+\[([\d,]*)\]", ln).group(1))
        operands = re.findall(r"%([\w.\-]+)", ln.split("convolution(", 1)[1].split(")", 1)[0])
        rhs = shapes.get(operands[1]) if len(operands) > 1 else None
        labels = re.search(r"dim_labels=\w+_(\w+)->", ln).group(1)
        window = re.search(r"size=([\dx]+)", ln).group(1)
        flops = (
            (2.0 * math.prod(out) * math.prod(rhs) / rhs[labels.index("o")]) if rhs else math.nan
        )
        kind = "conv 3x3" if window == "3x3" else ("conv 1x1" if window == "1x1" else "conv wgrad")
        return kind, flops
    return None


def hlo_op_kinds(hlo_text: str) -> dict:
    """Maps each instruction name of an optimized HLO module to ``(kind, conv_flops)``."""
    comps = _computations(hlo_text)
    kinds = {}
    for lines in comps.values():
        for ln in lines:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*?\s([a-z][\w\-]*)\(", ln)
            if not m:
                continue
            inst, op = m.group(1), m.group(2)
            if op == "fusion":
                c = re.search(r"calls=%([\w.\-]+)", ln)
                body = comps.get(c.group(1), []) if c else []
                conv = conv_kind_and_flops(body)
                if conv:
                    kinds[inst] = conv
                    continue
                ops = {
                    mm.group(1)
                    for b in body
                    for mm in [re.search(r"=\s*\S+\s([a-z][\w\-]*)\(", b)]
                    if mm
                }
                kinds[inst] = (next((k for k in KINDS if k in ops), "elementwise fusion"), 0.0)
            elif op == "convolution":
                kinds[inst] = conv_kind_and_flops([ln] + lines) or ("other", 0.0)
            else:
                kinds[inst] = (op if op in KINDS else "other", 0.0)
    return kinds


def trace_events(log_dir: str) -> list:
    """Complete ("X") events of the Perfetto trace written by `jax.profiler.trace`."""
    files = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}: was the trace written?")
    with gzip.open(sorted(files)[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _table(title, wall, steps, secs, flops, count):
    total = sum(secs.values())
    print(
        f"\n{title}: {wall / steps:.3f} s/step wall; ops sum to {total / steps:.3f} s/step "
        f"({total / wall:.2f} CPUs busy)"
    )
    print(f"{'kind':<28} | {'s/step':>7} | {'share':>6} | {'GFLOP/s':>7} | {'ops/step':>8}")
    for kind, s in secs.most_common():
        gf = f"{flops[kind] / s / 1e9:7.0f}" if flops.get(kind) else f"{'':7}"
        print(
            f"{kind:<28} | {s / steps:7.3f} | {s / total:6.1%} | {gf} | {count[kind] / steps:8.0f}"
        )


def profile_ours(batch: int, steps: int, top: int, trace_dir=None) -> None:
    import jax

    from benchmarks.ours_jax import TrainBench

    bench = TrainBench(batch)
    kinds = hlo_op_kinds(bench.compiled.as_text())
    bench.run()  # warm-up
    log_dir = trace_dir or tempfile.mkdtemp(prefix="step_profile_")
    wall = 0.0
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            wall += bench.run()
    secs, flops, count, by_op = (collections.Counter() for _ in range(4))
    for e in trace_events(log_dir):
        if e["name"] not in kinds:
            continue  # runtime and Python events, not HLO ops
        kind, fl = kinds[e["name"]]
        secs[kind] += e["dur"] * 1e-6
        flops[kind] += fl
        count[kind] += 1
        by_op[e["name"]] += e["dur"] * 1e-6
    if not secs:
        raise RuntimeError(f"no trace event of {log_dir} matched an HLO op name")
    _table(f"ours (JAX/XLA), batch {batch}, {steps} traced steps", wall, steps, secs, flops, count)
    print(f"slowest {top} ops (s/step):")
    for name, s in by_op.most_common(top):
        print(f"  {s / steps:7.3f}  {kinds[name][0]:<20} {name}")
    print(f"(trace in {log_dir})")


#: aten ops of the peer's step grouped like ours.
PEER_GROUPS = (
    ("conv", "conv (fwd, bwd-input, wgrad)"),
    ("addmm", "dot"),
    ("mm", "dot"),
    ("bmm", "dot"),
    ("baddbmm", "dot"),
    ("group_norm", "group norm (fwd+bwd)"),
    ("silu", "swish (fwd+bwd)"),
    ("adam", "optimizer + EMA"),
    ("lerp", "optimizer + EMA"),
    ("_foreach", "optimizer + EMA"),
    ("copy_", "copy"),
    ("cat", "copy"),
    ("softmax", "softmax"),
)


def profile_peer(batch: int, steps: int, top: int) -> None:
    import time

    import torch

    from benchmarks.peer_diffusers import PeerTrainer

    trainer = PeerTrainer(batch)
    trainer.step()  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        wall = time.perf_counter() - t0
    secs, count, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        s = ev.self_cpu_time_total * 1e-6
        if s <= 0:
            continue
        name = ev.key.removeprefix("aten::")
        group = next((g for k, g in PEER_GROUPS if k in name), "other")
        secs[group] += s
        count[group] += ev.count
        by_op[ev.key] += s
    _table(
        f"peer (diffusers/torch), batch {batch}, {steps} profiled steps",
        wall,
        steps,
        secs,
        {},
        count,
    )
    print(f"slowest {top} aten ops by self time (s/step):")
    for name, s in by_op.most_common(top):
        print(f"  {s / steps:7.3f}  {name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="profiled steps (after one warm-up step)")
    p.add_argument("--top", type=int, default=10, help="print the N slowest ops")
    p.add_argument("--peer", action="store_true", help="also profile the diffusers peer")
    p.add_argument("--trace-dir", default=None, help="keep our trace here (default: a temp dir)")
    args = p.parse_args(argv)

    from diffusion import cpu_runtime

    cpu_runtime.apply_xla_cpu_flags()  # as launch.py does; an XLA_FLAGS value given wins
    cpu_runtime.keep_freed_memory()  # DDPM_KEEP_FREED_MEMORY (unset: 0)
    profile_ours(args.batch, args.steps, args.top, args.trace_dir)
    if args.peer:
        profile_peer(args.batch, args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
