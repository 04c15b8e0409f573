"""One entry point for the speed and memory benchmarks, ours (JAX) beside the peer (diffusers).

    python -m benchmarks.run                      # everything (also: make bench)
    python -m benchmarks.run --quick              # smoke run: batch 2, 1 repeat, short chains
    python -m benchmarks.run --sections train,peer --repeats 7 --threads 2 --out /tmp/b.json

Sections (``--sections``, comma-separated; default all):
  train   the project's real CIFAR10 train step (``diffusion.training.step.make_train_step`` on
          experiments/cifar10.py: forward, ε-MSE, backward, clip + Adam, EMA) at batch 8 and 32:
          compile time, images/s (batch / median step time), achieved FLOP/s (XLA cost analysis
          flops / median time) and its fraction of the fp32 matmul peak measured in this run.
  peer    adds the diffusers ``UNet2DModel`` (same architecture, 35,746,307 parameters) with a
          PyTorch train step to ``train`` (steps alternate ours/peer each round), ``sample`` and
          ``memory``. The peer runs in its own process (benchmarks/peer_process.py; its step is
          timed there), so the two runtimes' threads and heaps never share the process
          (``--peer_in_process`` for the old way). Skipped with a message if torch/diffusers do
          not import.
  sample  per-step time of ``diffusion.sampling.ancestral_sample`` (one lax.scan) vs the bare
          jitted forward at the same batch (overhead %), and vs diffusers' DDPMScheduler loop.
  memory  peak RSS (``VmHWM`` of /proc/self/status) of ~3 train steps at batch 32, each side in a fresh
          subprocess (``python -m benchmarks.rss_child``), with the RSS after imports beside it.
  eval    bits/dim throughput of ``diffusion.likelihood.bits_per_dim`` on the CIFAR10 U-Net
          (timed with a short K-step bound, extrapolated to T = 1000 network calls per image) and
          Inception feature throughput (``diffusion.metrics.inception.make_feature_fn``).

Threads: both frameworks use the CPUs this process may run on (``--threads N`` pins the process
to N CPUs, which sizes XLA's pool, and sets ``torch.set_num_threads(N)``).
Timings are only meaningful on otherwise idle cores. Results go to ``--out`` (default
benchmarks/results.json; benchmarks/results_quick.json with ``--quick``) and a table is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.common import (  # noqa: E402
    fmt,
    format_table,
    machine_info,
    matmul_peak,
    set_threads,
    summarize,
    versions,
)

SECTIONS = ("train", "peer", "sample", "memory", "eval")
TARGETS = {
    "train_speedup": 1.25,
    "sample_speedup": 1.25,
    "flops_fraction": 0.75,
    "sampler_overhead_pct": 2.0,
    "rss_ratio": 1.0,
}
_SWITCH_PAUSE_S = 0.1  # between ours and peer runs (untimed): lets idle worker threads park


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 2, 1 repeat, 4-step chains, small matmul",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per measurement (default 5; 1 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps after compile (default 2; 1 with --quick)",
    )
    p.add_argument("--threads", type=int, default=None, help="CPUs for both sides (default all)")
    p.add_argument(
        "--keep_freed_memory",
        nargs="?",
        const="1",
        default=None,
        choices=["0", "1", "sync"],
        help="our side's DDPM_KEEP_FREED_MEMORY (cpu_runtime.keep_freed_memory: XLA's "
        "per-step buffers reused instead of faulted in afresh, see RESULTS.md). Default: the "
        "variable if set, else sync (what launch.py --mode train runs; --mode "
        "train_and_evaluate runs 0, glibc's defaults); the bare flag means 1",
    )
    p.add_argument(
        "--peer_in_process",
        action="store_true",
        help="run the peer (torch) in this process, as before 2026-12-02; default: in its own "
        "process (benchmarks/peer_process.py), steps still alternating round by round",
    )
    p.add_argument(
        "--model_dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="our train step's compute dtype (the targets are for float32)",
    )
    p.add_argument(
        "--conv_impl",
        default=None,
        help="our config.runtime.conv_impl for every section (auto | xla | winograd | "
        "winograd4 | mixed; default: the config's, i.e. auto)",
    )
    p.add_argument(
        "--baseline_conv_impl",
        default=None,
        help="also time our train/sample steps with this conv_impl (e.g. xla) in the "
        "same alternating rounds: before/after ratios from one run",
    )
    full = dict(
        train_batches="8,32",
        sample_batch=8,
        sample_steps=20,
        memory_batch=32,
        memory_steps=3,
        bpd_batch=4,
        bpd_steps=20,
        inception_batch=32,
        matmul_sizes="1024,2048",
        repeats=5,
        warmup=2,
    )
    quick = dict(
        train_batches="2",
        sample_batch=2,
        sample_steps=4,
        memory_batch=2,
        memory_steps=2,
        bpd_batch=2,
        bpd_steps=4,
        inception_batch=2,
        matmul_sizes="1024",
        repeats=1,
        warmup=1,
    )
    p.add_argument("--train_batches", help="comma-separated (default 8,32)")
    p.add_argument("--sample_batch", type=int, help="default 8")
    p.add_argument("--sample_steps", type=int, help="K steps of the timed chain (default 20)")
    p.add_argument("--memory_batch", type=int, help="default 32")
    p.add_argument("--memory_steps", type=int, help="train steps in each child (default 3)")
    p.add_argument("--bpd_batch", type=int, help="default 4")
    p.add_argument(
        "--bpd_steps",
        type=int,
        help="K of the timed bound; images/s is extrapolated to T = 1000 (default 20)",
    )
    p.add_argument("--inception_batch", type=int, help="default 32")
    p.add_argument(
        "--matmul_sizes", help="comma-separated n of the n×n matmuls (default 1024,2048)"
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results.json)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    # --quick changes the defaults only: flags given explicitly win.
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.train_batches = [int(b) for b in str(args.train_batches).split(",")]
    args.matmul_sizes = [int(n) for n in str(args.matmul_sizes).split(",")]
    if args.out is None:
        name = "results_quick.json" if args.quick else "results.json"
        args.out = os.path.join(REPO, "benchmarks", name)
    return args


def _ratio(a, b) -> float:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def _met(value, target, op) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "yes" if op(value, target) else "NO"


def load_peer(threads: int, in_process: bool = False):
    """``(peer, None)``, or ``(None, reason)`` if torch/diffusers are missing. By default the
    peer runs in its own process (`benchmarks.peer_process.PeerProcess`, same interface as the
    module); ``in_process`` imports ``benchmarks.peer_diffusers`` here instead (the method of
    the runs before 2026-12-02)."""
    if not in_process:
        from benchmarks.peer_process import PeerProcess, PeerProcessError

        try:
            return PeerProcess(threads), None
        except PeerProcessError as e:
            return None, str(e)
    try:
        from benchmarks import peer_diffusers
    except Exception as e:  # pylint: disable=broad-except  (ImportError, or a broken install)
        return None, f"{type(e).__name__}: {e}"
    peer_diffusers.set_threads(threads)
    return peer_diffusers, None


def _release(peer, obj) -> None:
    """Frees a peer trainer/sampler (in the child process where the peer runs there)."""
    if obj is not None and hasattr(peer, "drop"):
        peer.drop(obj)


# ----------------------------------------------------------------------------- sections
def section_train(args, peer, peak: float, res: Dict[str, Any]) -> None:
    from benchmarks.ours_jax import CIFAR10_PARAMS, TrainBench

    do_ours = "train" in args.sections
    out = res.setdefault("train", {"batches": {}})
    for B in args.train_batches:
        log(f"train: compiling our step at batch {B}")
        ours = TrainBench(B, dtype=args.model_dtype, conv_impl=args.conv_impl)
        assert ours.n_params == CIFAR10_PARAMS, ours.n_params
        r = {
            "batch": B,
            "n_params": ours.n_params,
            "lower_s": ours.lower_s,
            "compile_s": ours.compile_s,
            "xla_flops_per_step": ours.flops,
        }
        log(
            f"train: lower {ours.lower_s:.1f} s + compile {ours.compile_s:.1f} s, "
            f"{ours.flops / 1e9:.1f} GFLOP/step"
        )
        base = None
        if args.baseline_conv_impl and do_ours:
            log(f"train: compiling our step with conv_impl={args.baseline_conv_impl} (baseline)")
            base = TrainBench(B, dtype=args.model_dtype, conv_impl=args.baseline_conv_impl)
            r["baseline"] = {
                "conv_impl": args.baseline_conv_impl,
                "lower_s": base.lower_s,
                "compile_s": base.compile_s,
            }
        trainer = None
        if peer is not None:
            trainer = peer.PeerTrainer(B)
            log(
                f"train: peer UNet2DModel built, {trainer.n_params:,} parameters, "
                f"Adam {trainer.adam_impl}"
            )
            r["peer_n_params"] = trainer.n_params
            r["peer_adam"] = trainer.adam_impl
        for _ in range(args.warmup):
            if do_ours:
                ours.run()
            if base is not None:
                base.run()
            if trainer is not None:
                trainer.run()
        t_ours, t_peer, t_base = [], [], []
        for i in range(
            args.repeats
        ):  # alternate: one ours step, (one baseline step,) one peer step
            if do_ours:
                t_ours.append(ours.run())
                time.sleep(_SWITCH_PAUSE_S)
            if base is not None:
                t_base.append(base.run())
                time.sleep(_SWITCH_PAUSE_S)
            if trainer is not None:
                t_peer.append(trainer.run())
                time.sleep(_SWITCH_PAUSE_S)
            log(
                f"train b{B} round {i + 1}/{args.repeats}: ours "
                f"{fmt(t_ours[-1] if t_ours else None)} s, peer {fmt(t_peer[-1] if t_peer else None)} s"
                + (f", baseline {fmt(t_base[-1])} s" if t_base else "")
            )
        so, sp = summarize(t_ours), summarize(t_peer)
        if base is not None:
            sb_ = summarize(t_base)
            r["baseline"].update(
                step_s=sb_, images_per_s=B / sb_["median"], final_loss=base.last_loss
            )
            r["speedup_ours_over_baseline"] = sb_["median"] / so["median"]
        r["ours"] = {
            "step_s": so,
            "images_per_s": B / so["median"],
            "flops_per_s": ours.flops / so["median"],
            "fraction_of_peak": ours.flops / so["median"] / peak,
            "final_loss": ours.last_loss,
        }
        if trainer is not None:
            r["peer"] = {
                "step_s": sp,
                "images_per_s": B / sp["median"],
                "flops_per_s": ours.flops / sp["median"],
                "fraction_of_peak": ours.flops / sp["median"] / peak,
                "final_loss": trainer.last_loss,
                "flops_note": "our XLA flop count (same architecture) / peer median time",
            }
            r["speedup_ours_over_peer"] = _ratio(
                r["ours"]["images_per_s"], r["peer"]["images_per_s"]
            )
        out["batches"][str(B)] = r
        _release(peer, trainer)
        del ours, trainer, base


def section_sample(args, peer, res: Dict[str, Any]) -> None:
    from benchmarks.ours_jax import SamplerBench

    B, K = args.sample_batch, args.sample_steps
    log(f"sample: compiling forward and {K}-step lax.scan sampler at batch {B}")
    sb = SamplerBench(B, K, conv_impl=args.conv_impl)
    base = None
    if args.baseline_conv_impl:
        log(f"sample: compiling with conv_impl={args.baseline_conv_impl} (baseline)")
        base = SamplerBench(B, K, conv_impl=args.baseline_conv_impl)
    ps = peer.PeerSampler(B, K) if peer is not None else None
    f_ours, c_ours, f_peer, c_peer, c_base = [], [], [], [], []
    n_fwd = 4
    for i in range(args.repeats):
        f_ours += [sb.run_forward() for _ in range(n_fwd)]
        c_ours.append(sb.run_chain())
        time.sleep(_SWITCH_PAUSE_S)
        if base is not None:
            c_base.append(base.run_chain())
            time.sleep(_SWITCH_PAUSE_S)
        if ps is not None:
            c_peer.append(ps.run_chain())
            f_peer += [ps.run_forward() for _ in range(n_fwd)]
            time.sleep(_SWITCH_PAUSE_S)
        log(f"sample round {i + 1}/{args.repeats}")
    fo, co = summarize(f_ours), summarize(c_ours)
    r = {
        "batch": B,
        "steps": K,
        "forward_compile_s": sb.fwd_compile_s,
        "sampler_compile_s": sb.sample_compile_s,
        "forward_flops": sb.forward_flops,
        "ours": {
            "forward_s": fo,
            "chain_s": co,
            "per_step_s": co["median"] / K,
            "overhead_pct": 100.0 * (co["median"] / K - fo["median"]) / fo["median"],
        },
    }
    if ps is not None:
        fp, cp = summarize(f_peer), summarize(c_peer)
        r["peer"] = {
            "forward_s": fp,
            "chain_s": cp,
            "per_step_s": cp["median"] / ps.steps,
            "steps": ps.steps,
            "overhead_pct": 100.0 * (cp["median"] / ps.steps - fp["median"]) / fp["median"],
            "what": "diffusers DDPMScheduler(fixed_large, clip) loop, torch.inference_mode",
        }
        r["speedup_ours_over_peer"] = _ratio(r["peer"]["per_step_s"], r["ours"]["per_step_s"])
    if base is not None:
        cb = summarize(c_base)
        r["baseline"] = {
            "conv_impl": args.baseline_conv_impl,
            "chain_s": cb,
            "per_step_s": cb["median"] / K,
            "forward_compile_s": base.fwd_compile_s,
            "sampler_compile_s": base.sample_compile_s,
        }
        r["speedup_ours_over_baseline"] = cb["median"] / co["median"]
    _release(peer, ps)
    res["sample"] = r


def _rss_child(side: str, args, threads: int) -> Dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.rss_child",
        side,
        "--batch",
        str(args.memory_batch),
        "--steps",
        str(args.memory_steps),
        "--threads",
        str(threads),
    ]
    if side == "ours" and args.conv_impl:
        cmd += ["--conv_impl", args.conv_impl]
    log(f"memory: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RSS_RESULT "):
            return json.loads(line[len("RSS_RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"exit {proc.returncode}: " + " / ".join(tail)}


def section_memory(args, peer, threads: int, res: Dict[str, Any]) -> None:
    r = {
        "batch": args.memory_batch,
        "steps": args.memory_steps,
        "ours": _rss_child("ours", args, threads),
    }
    if peer is not None:
        r["peer"] = _rss_child("peer", args, threads)
        a, b = r["ours"].get("peak_rss_mb"), r["peer"].get("peak_rss_mb")
        r["ratio_ours_over_peer"] = _ratio(a, b)
        a, b = r["ours"].get("step_phase_peak_rss_mb"), r["peer"].get("step_phase_peak_rss_mb")
        r["step_phase_ratio_ours_over_peer"] = _ratio(a, b)
    r["note"] = (
        "peak_rss_mb = VmHWM of the child (whole process: imports, build, compile, steps); "
        "step_phase_peak_rss_mb = VmHWM reset after the first step; ru_maxrss_mb is "
        "kept for reference but includes the parent's RSS inherited across fork+exec"
    )
    res["memory"] = r


def section_eval(args, res: Dict[str, Any]) -> None:
    from benchmarks.ours_jax import BpdBench, InceptionBench

    r = {}
    B, K = args.bpd_batch, args.bpd_steps
    log(f"eval: compiling bits_per_dim (K={K} steps) at batch {B}")
    bb = BpdBench(B, K, conv_impl=args.conv_impl)
    s = summarize([bb.run() for _ in range(args.repeats)])
    per_image_T1000 = s["median"] * (1000.0 / K) / B
    r["bpd"] = {
        "batch": B,
        "timed_steps": K,
        "compile_s": bb.compile_s,
        "time_s": s,
        "images_per_s_T1000": 1.0 / per_image_T1000,
        "seconds_per_image_T1000": per_image_T1000,
        "note": f"CIFAR10 U-Net; timed with the schedule respaced to K={K} steps, extrapolated linearly to "
        "T=1000 network calls per image",
    }
    del bb
    try:
        log(f"eval: Inception features at batch {args.inception_batch}")
        ib = InceptionBench(args.inception_batch)
        s = summarize([ib.run() for _ in range(args.repeats)])
        r["inception"] = {
            "batch": args.inception_batch,
            "load_s": ib.load_s,
            "first_call_s": ib.first_call_s,
            "time_s": s,
            "images_per_s": args.inception_batch / s["median"],
        }
    except Exception as e:  # pylint: disable=broad-except  (weights not installed)
        r["inception"] = {"skipped": f"{type(e).__name__}: {e}"}
        log(f"inception skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
    res["eval"] = r


# ----------------------------------------------------------------------------- table
def build_table(res: Dict[str, Any]) -> List[List[str]]:
    rows = []
    peak = res.get("matmul_peak", {}).get("peak_flops")
    if peak:
        rows.append(["fp32 matmul peak (GFLOP/s)", fmt(peak / 1e9, ".1f"), "", "", "", ""])
    for B, r in res.get("train", {}).get("batches", {}).items():
        o, p = r.get("ours", {}), r.get("peer")
        sp = r.get("speedup_ours_over_peer", math.nan)
        rows.append(
            [f"train b{B} compile (s)", fmt(r["compile_s"] + r["lower_s"], ".1f"), "", "", "", ""]
        )
        if o.get("step_s", {}).get("n"):
            rows.append(
                [
                    f"train b{B} images/s",
                    fmt(o["images_per_s"], ".2f"),
                    fmt(p["images_per_s"], ".2f") if p else "n/a",
                    fmt(sp, ".2f"),
                    f">= {TARGETS['train_speedup']}x",
                    _met(sp, TARGETS["train_speedup"], float.__ge__) if p else "n/a",
                ]
            )
            rows.append(
                [
                    f"train b{B} GFLOP/s (XLA count)",
                    fmt(o["flops_per_s"] / 1e9, ".1f"),
                    fmt(p["flops_per_s"] / 1e9, ".1f") if p else "n/a",
                    fmt(sp, ".2f"),
                    "",
                    "",
                ]
            )
            rows.append(
                [
                    f"train b{B} fraction of matmul peak",
                    fmt(o["fraction_of_peak"], ".2f"),
                    fmt(p["fraction_of_peak"], ".2f") if p else "n/a",
                    "",
                    f">= {TARGETS['flops_fraction']}",
                    _met(o["fraction_of_peak"], TARGETS["flops_fraction"], float.__ge__),
                ]
            )
        elif p:
            rows.append([f"train b{B} images/s", "n/a", fmt(p["images_per_s"], ".2f"), "", "", ""])
        bl = r.get("baseline")
        if bl and "images_per_s" in bl:
            rows.append(
                [
                    f"train b{B} images/s, ours with conv_impl={bl['conv_impl']}",
                    fmt(bl["images_per_s"], ".2f"),
                    "",
                    f"{fmt(r['speedup_ours_over_baseline'], '.2f')} (ours/this)",
                    f"compile {fmt(bl['compile_s'] + bl['lower_s'], '.1f')} s",
                    "",
                ]
            )
    s = res.get("sample")
    if s:
        o, p = s["ours"], s.get("peer")
        sp = s.get("speedup_ours_over_peer", math.nan)
        rows.append(
            [
                f"sample b{s['batch']} per-step ms",
                fmt(o["per_step_s"] * 1e3, ".1f"),
                fmt(p["per_step_s"] * 1e3, ".1f") if p else "n/a",
                fmt(sp, ".2f"),
                f">= {TARGETS['sample_speedup']}x (peer/ours time)",
                _met(sp, TARGETS["sample_speedup"], float.__ge__) if p else "n/a",
            ]
        )
        bl = s.get("baseline")
        if bl:
            rows.append(
                [
                    f"sample b{s['batch']} per-step ms, ours with conv_impl={bl['conv_impl']}",
                    fmt(bl["per_step_s"] * 1e3, ".1f"),
                    "",
                    f"{fmt(s['speedup_ours_over_baseline'], '.2f')} (this/ours time)",
                    "",
                    "",
                ]
            )
        rows.append(
            [
                f"sample b{s['batch']} compile (s) forward / {s['steps']}-step chain",
                f"{fmt(s['forward_compile_s'], '.1f')} / {fmt(s['sampler_compile_s'], '.1f')}",
                "",
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"sample b{s['batch']} forward ms",
                fmt(o["forward_s"]["median"] * 1e3, ".1f"),
                fmt(p["forward_s"]["median"] * 1e3, ".1f") if p else "n/a",
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                "sampler overhead vs forward (%)",
                fmt(o["overhead_pct"], "+.1f"),
                fmt(p["overhead_pct"], "+.1f") if p else "n/a",
                "",
                f"<= {TARGETS['sampler_overhead_pct']}%",
                _met(o["overhead_pct"], TARGETS["sampler_overhead_pct"], float.__le__),
            ]
        )
    m = res.get("memory")
    if m:
        o, p = m["ours"], m.get("peer") or {}
        rows.append(
            [
                "RSS after imports (MiB)",
                fmt(o.get("baseline_rss_mb"), ".0f"),
                fmt(p.get("baseline_rss_mb"), ".0f") if p else "n/a",
                "",
                "",
                "",
            ]
        )
        ratio = m.get("ratio_ours_over_peer", math.nan)
        rows.append(
            [
                f"peak RSS train b{m['batch']} (MiB)",
                fmt(o.get("peak_rss_mb"), ".0f"),
                fmt(p.get("peak_rss_mb"), ".0f") if p else "n/a",
                fmt(ratio, ".2f"),
                f"<= {TARGETS['rss_ratio']}",
                _met(ratio, TARGETS["rss_ratio"], float.__le__),
            ]
        )
        rows.append(
            [
                "  of which step phase only (MiB)",
                fmt(o.get("step_phase_peak_rss_mb"), ".0f"),
                fmt(p.get("step_phase_peak_rss_mb"), ".0f") if p else "n/a",
                fmt(m.get("step_phase_ratio_ours_over_peer", math.nan), ".2f"),
                "",
                "",
            ]
        )
        rows.append(
            [
                "  final RSS after malloc_trim (MiB)",
                fmt(o.get("final_rss_after_malloc_trim_mb"), ".0f"),
                fmt(p.get("final_rss_after_malloc_trim_mb"), ".0f") if p else "n/a",
                "",
                "",
                "",
            ]
        )
        if "error" in o or "error" in p:
            rows.append(["memory child error", o.get("error", ""), p.get("error", ""), "", "", ""])
    e = res.get("eval")
    if e:
        b = e["bpd"]
        rows.append(
            [
                f"bits/dim images/s (T=1000, extrap. from K={b['timed_steps']})",
                fmt(b["images_per_s_T1000"], ".3g"),
                "",
                "",
                "",
                "",
            ]
        )
        i = e.get("inception", {})
        rows.append(
            [
                f"Inception features images/s (b{i.get('batch', '?')})",
                fmt(i.get("images_per_s"), ".1f") if "images_per_s" in i else "skipped",
                "",
                "",
                "",
                "",
            ]
        )
    return rows


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = set_threads(args.threads)  # before JAX starts its thread pool
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from diffusion import cpu_runtime

    cpu_runtime.apply_xla_cpu_flags()  # as launch.py does; an XLA_FLAGS value given wins
    # As launch.py --mode train runs; children (rss_child) inherit it, the peer ignores it.
    os.environ[cpu_runtime.KEEP_FREED_MEMORY_ENV] = (
        args.keep_freed_memory or cpu_runtime.keep_freed_memory_mode(default="sync")
    )
    keep = cpu_runtime.keep_freed_memory()
    import jax

    res: Dict[str, Any] = {
        "command": " ".join(["python", "-m", "benchmarks.run"] + argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": versions(),
        "threads": threads,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "args": {k: v for k, v in vars(args).items()},
        "quick": args.quick,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "conv_impl": args.conv_impl or "auto (config default)",
        "keep_freed_memory": os.environ[cpu_runtime.KEEP_FREED_MEMORY_ENV] if keep else False,
        "targets": TARGETS,
    }
    print(f"command: {res['command']}")
    print(
        f"machine: {res['machine']['cpu_model']}, {res['machine']['cpu_count']} logical CPUs, "
        f"{threads} used by both sides; backend {res['jax_backend']}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()))
    print(f"XLA_FLAGS: {res['xla_flags'] or '(none)'}")
    print(f"our runtime.conv_impl: {res['conv_impl']}")
    print(
        f"our side's {cpu_runtime.KEEP_FREED_MEMORY_ENV}: "
        f"{os.environ[cpu_runtime.KEEP_FREED_MEMORY_ENV]} (applied: {keep})"
    )

    load = res["machine"].get("loadavg_at_start")
    if load and load[0] > 0.5:
        print(
            f"WARNING: 1-minute load average {load[0]:.2f} before starting: other processes are "
            "using the CPUs, so these timings are not valid (torch's OpenMP threads in "
            "particular slow down many-fold when a core is shared)."
        )
    peer, reason = (None, "not selected")
    if "peer" in args.sections:
        peer, reason = load_peer(threads, in_process=args.peer_in_process)
        if peer is None:
            print(f"peer skipped: {reason}")
        else:
            print(
                f"peer: diffusers UNet2DModel ({peer.EXPECTED_PARAMS:,} parameters asserted), "
                f"torch threads {threads}, "
                + ("in this process" if args.peer_in_process else f"own process {peer.pid}")
            )
    res["peer"] = {
        "available": peer is not None,
        "reason": reason,
        "process": "same" if args.peer_in_process else "own",
    }
    if peer is not None:
        res["peer"]["unet_kwargs"] = peer.UNET_KWARGS

    if "train" in args.sections or "peer" in args.sections:
        log(f"matmul peak: sizes {args.matmul_sizes}")
        res["matmul_peak"] = matmul_peak(args.matmul_sizes, max(args.repeats, 3))
        log(f"matmul peak {res['matmul_peak']['peak_flops'] / 1e9:.1f} GFLOP/s")
        if "train" in args.sections or peer is not None:
            section_train(args, peer, res["matmul_peak"]["peak_flops"], res)
    if "sample" in args.sections:
        section_sample(args, peer, res)
    if "memory" in args.sections:
        section_memory(args, peer, threads, res)
    if "eval" in args.sections:
        section_eval(args, res)
    if hasattr(peer, "close"):
        peer.close()

    try:
        res["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    rows = build_table(res)
    res["table"] = {"header": ["item", "ours", "peer", "ratio", "target", "met?"], "rows": rows}
    print()
    if args.quick:
        print("QUICK SMOKE RUN (batch 2, 1 repeat): numbers are not benchmark results")
    print(format_table(res["table"]["header"], rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
