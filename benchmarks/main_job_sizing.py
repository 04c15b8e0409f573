"""Sizing the main job (issue 16): train candidate configs, then compare samplers by FID/KID.

The main job (``make main``: ``launch.py --config experiments/mnist5k.py --mode
train_and_evaluate``) must finish in about 15 min on a slow day on 2 CPU cores and still end with
recognisable digits and an FID within 2x of the real-data floor. This script measures what that
costs, always next to the matmul peak of the hour (the machine is shared; timings are noisy).

Subcommands (all print their figures and write a JSON next to the run)::

    # the fp32 matmul peak (GFLOP/s) of the hour, as benchmarks/common.py measures it
    python -m benchmarks.main_job_sizing peak

    # train one candidate with launch.py (any --config.* override after --), timing the compile,
    # the steps/s (TensorBoard 'steps_per_sec' of clu's ReportProgress) and the wall time
    python -m benchmarks.main_job_sizing train --workdir /tmp/sizing/A -- \\
        --config.data.image_size=16 --config.model.ch_mult='(1,2)' --config.training.num_train_steps=1500

    # draw N samples with several samplers from the EMA parameters of the newest checkpoint and
    # score each (FID, KID) against the reference the evaluate code uses (config.eval.fid_split),
    # plus the real-data floor (real test images at the same N against the same reference),
    # the Inception throughput and the bits/dim cost on a few examples
    python -m benchmarks.main_job_sizing eval --workdir /tmp/sizing/A --num 256 \\
        --samplers ancestral:25:var=fixedsmall,ancestral:50:var=fixedlarge,ddim:25 --bpd_examples 32

    # train-step speed of candidates in one process, interleaved rounds, with XLA FLOPs/step
    python -m benchmarks.main_job_sizing steps 'A:data.image_size=16;model.ch_mult=(1,2,2)' \
        'B:data.image_size=16;model.ch_mult=(1,2);model.attn_resolutions=()'

    # a sample grid of one sampler
    python -m benchmarks.main_job_sizing grid --workdir /tmp/sizing/A --sampler ddim:50 \\
        --out /tmp/sizing/grid.png

Sampler specs: ``METHOD[:K][:name=value]...`` of the sampler registry
(`diffusion.samplers.parse_spec`: ``ancestral:50``, ``ancestral:0`` the full chain, ``ddim:25``,
``ddim:25:eta=0.5``, ``dpmpp_2m:10``, ``heun:6``), plus ``:var=fixedsmall|fixedlarge`` to sample
a fixed-variance model with the other variance. (Results written before the registry used
``respacedK:VAR`` / ``ddimK[:eta]`` / ``fullT:VAR`` and a private RNG salt.)

Run it from a snapshot of the library (``git archive HEAD | tar -x -C DIR``; ``python
DIR/benchmarks/main_job_sizing.py ...``) when others edit the working tree: the script imports
``diffusion`` and runs ``launch.py`` from the tree it sits in.

The config of a workdir is rebuilt from ``experiments/mnist5k.py`` (or ``--config``) updated
with the workdir's ``config.json`` (what launch.py trained with).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ----------------------------------------------------------------------------- helpers
def _peak_gflops() -> float:
    from benchmarks.common import matmul_peak

    return matmul_peak()["peak_flops"] / 1e9


def _apply_cpu_flags() -> None:
    from diffusion import cpu_runtime

    cpu_runtime.apply_xla_cpu_flags()
    cpu_runtime.keep_freed_memory()  # DDPM_KEEP_FREED_MEMORY (unset: 0)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _dump(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def _update(node, saved: dict) -> None:
    """Sets ``node``'s fields from ``saved`` (nested dicts recursively), with the field's type;
    fields ``node`` does not have are skipped."""
    import ml_collections

    for k, v in saved.items():
        if k not in node:
            continue
        cur = node[k]
        if isinstance(cur, ml_collections.ConfigDict) and isinstance(v, dict):
            _update(cur, v)
        elif isinstance(cur, tuple) or v is None or cur is None:
            node[k] = _tuplify(v)
        elif isinstance(cur, (int, float, str, bool)):
            node[k] = type(cur)(v)
        else:
            node[k] = _tuplify(v)


def load_config(workdir: str, base: str):
    """``base``'s config updated with ``<workdir>/config.json`` (what launch.py trained with;
    lists back to tuples; fields of older versions mapped by `samplers.migrate_saved_config`)."""
    import importlib.util

    from diffusion import samplers

    spec = importlib.util.spec_from_file_location("sizing_base_config", base)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    with open(os.path.join(workdir, "config.json")) as f:
        saved = samplers.migrate_saved_config(json.load(f))
    _update(config, saved)
    return config


def parse_sampler(text: str, config):
    """``METHOD[:K][:name=value]...[:var=fixedsmall|fixedlarge]`` -> ``(config, spec)``: the
    sampler spec of `diffusion.samplers.parse_spec` (e.g. ``ancestral:50``, ``ddim:25``,
    ``ancestral:0:var=fixedsmall`` for the full chain with β̃) and the config, a copy with
    ``diffusion.var_type`` replaced when ``var=`` is given (a fixed-variance model's samplers can
    use either variance)."""
    from diffusion import samplers

    parts = [p for p in text.split(":") if not p.startswith("var=")]
    var = [p.split("=", 1)[1] for p in text.split(":") if p.startswith("var=")]
    if var:
        config = config.copy_and_resolve_references()
        config.diffusion.var_type = var[-1]
    return config, samplers.parse_spec(":".join(parts), config)


def make_sample_fn(config, model, params, text: str):
    """``fn(key, n) -> [n, H, W, C]`` in [-1, 1] for the sampler string ``text`` (see
    `parse_sampler`), through the evaluation's own `make_sample_fn` (the registry's `draw`)."""
    from diffusion.evaluation.generator import make_sample_fn as eval_sample_fn

    config, spec = parse_sampler(text, config)
    return eval_sample_fn(config, model, params, spec)


def draw(sample_fn, num: int, batch: int, seed: int = 0):
    """``num`` uint8 samples in batches of ``batch``; returns (images, compile_s, run_s).

    The keys are the evaluation's (`rng.EVAL_SAMPLES` of ``seed``, batch i folded in as
    `evaluation.generator.sample_in_batches` does on one process), so at the evaluation's batch size these
    are the samples ``--mode evaluate`` draws. Compiled once (compile_s), then timed (run_s)."""
    import jax
    import numpy as np

    from diffusion import rng, sampling

    run = jax.jit(lambda k: sampling.to_uint8(sample_fn(k, batch)))
    key = jax.random.fold_in(rng.stream(seed, rng.EVAL_SAMPLES), 0)
    t0 = time.perf_counter()
    lowered = run.lower(jax.random.fold_in(key, 0)).compile()
    compile_s = time.perf_counter() - t0
    out, t0 = [], time.perf_counter()
    for i in range(math.ceil(num / batch)):
        out.append(np.asarray(lowered(jax.random.fold_in(key, i))))
    run_s = time.perf_counter() - t0
    return np.concatenate(out)[:num], compile_s, run_s


# ----------------------------------------------------------------------------- peak
def cmd_peak(args) -> None:
    _apply_cpu_flags()
    g = _peak_gflops()
    _log(f"matmul peak: {g:.1f} GFLOP/s (fast day ~402)  loadavg {os.getloadavg()}")


# ----------------------------------------------------------------------------- train
def _tb_scalars(workdir: str, tag: str):
    import tensorflow as tf

    vals = []
    for f in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for e in tf.compat.v1.train.summary_iterator(f):
            for v in e.summary.value:
                if v.tag == tag:
                    vals.append(
                        (
                            e.step,
                            e.wall_time,
                            float(tf.make_ndarray(v.tensor))
                            if v.HasField("tensor")
                            else v.simple_value,
                        )
                    )
    return vals


def cmd_train(args) -> None:
    _apply_cpu_flags()
    peak_before = _peak_gflops()
    cmd = [
        sys.executable,
        os.path.join(ROOT, "launch.py"),
        "--config",
        args.config,
        "--workdir",
        args.workdir,
        "--mode",
        "train",
        "--alsologtostderr",
    ] + args.overrides
    _log("$ " + " ".join(cmd))
    os.makedirs(args.workdir, exist_ok=True)
    log_path = os.path.join(args.workdir, "train.log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    peak_after = _peak_gflops()
    text = open(log_path).read()
    m = re.search(r"Compiled the train step in ([0-9.]+) s", text)
    compile_s = float(m.group(1)) if m else float("nan")
    sps = _tb_scalars(args.workdir, "steps_per_sec")
    losses = (
        [json.loads(l) for l in open(os.path.join(args.workdir, "metrics.jsonl"))]
        if os.path.exists(os.path.join(args.workdir, "metrics.jsonl"))
        else []
    )
    # time from the first logged step to the last, from the TensorBoard wall times
    res = {
        "workdir": args.workdir,
        "overrides": args.overrides,
        "rc": rc,
        "wall_s": wall,
        "compile_s": compile_s,
        "steps_per_sec": [v for _, _, v in sps],
        "steps_per_sec_median": (sorted(v for _, _, v in sps)[len(sps) // 2] if sps else None),
        "loss": [(l["step"], l["loss"]) for l in losses],
        "peak_gflops_before": peak_before,
        "peak_gflops_after": peak_after,
    }
    _dump(os.path.join(args.workdir, "sizing_train.json"), res)
    _log(
        f"rc={rc} wall {wall:.1f}s, compile {compile_s:.1f}s, steps/s median "
        f"{res['steps_per_sec_median']}, all {['%.2f' % v for v in res['steps_per_sec']]}"
    )
    _log(f"loss: {[(s, round(l, 4)) for s, l in res['loss']]}")
    _log(f"matmul peak before/after: {peak_before:.1f} / {peak_after:.1f} GFLOP/s")


# ----------------------------------------------------------------------------- steps
def _override(config, spec: str):
    """``'model.ch_mult=(1,2);training.batch_size=64'`` applied to ``config`` (literal values)."""
    import ast

    for item in filter(None, spec.split(";")):
        k, v = item.split("=", 1)
        sec, field = k.strip().split(".")
        config[sec][field] = ast.literal_eval(v.strip())
    return config


def cmd_steps(args) -> None:
    """Train-step speed of several configs measured in one process, rounds interleaved (so a
    shared machine's load hits all alike), with XLA's FLOPs per step (load-independent)."""
    _apply_cpu_flags()
    import importlib.util

    import jax
    import numpy as np

    from benchmarks.common import cost_flops
    from diffusion import factories, parallel, training
    from diffusion.data import create_input_pipeline

    spec = importlib.util.spec_from_file_location("sizing_base_config", args.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mesh = parallel.make_mesh()
    runs = []
    for name_spec in args.candidates:
        name, ov = name_spec.split(":", 1) if ":" in name_spec else (name_spec, "")
        config = _override(mod.get_config(), ov)
        model = factories.create_model(config)
        tx = factories.make_optimizer(config)
        step_fn = training.make_train_step(
            config, model, factories.schedule_from_config(config), tx, mesh
        )
        state = factories.init_state(config, model, tx, mesh)
        nparams = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
        batch = parallel.global_batch_from_local(
            next(create_input_pipeline(config).iterator(0)), mesh
        )
        key = jax.random.key(0)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, key).compile()
        comp = time.perf_counter() - t0
        state, m = compiled(state, batch, key)
        jax.block_until_ready(m)
        runs.append(
            {
                "name": name,
                "overrides": ov,
                "compile_s": comp,
                "params": nparams,
                "flops": cost_flops(compiled),
                "compiled": compiled,
                "state": state,
                "batch": batch,
                "key": key,
                "times": [],
            }
        )
        _log(
            f"{name}: {nparams:,} params, compile {comp:.1f}s, "
            f"{runs[-1]['flops'] / 1e9:.2f} GFLOP/step (XLA)"
        )
    peaks = [_peak_gflops()]
    for _ in range(args.rounds):
        for r in runs:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r["state"], m = r["compiled"](r["state"], r["batch"], r["key"])
            jax.block_until_ready(m)
            r["times"].append((time.perf_counter() - t0) / args.steps)
        peaks.append(_peak_gflops())
    _log(f"matmul peak during: {['%.0f' % p for p in peaks]} GFLOP/s")
    out = []
    for r in runs:
        med = sorted(r["times"])[len(r["times"]) // 2]
        out.append(
            {k: r[k] for k in ("name", "overrides", "compile_s", "params", "flops")}
            | {
                "s_per_step_median": med,
                "s_per_step_min": min(r["times"]),
                "steps_per_s_median": 1 / med,
                "steps_per_s_best": 1 / min(r["times"]),
            }
        )
        _log(
            f"{r['name']}: {1 / med:.2f} steps/s median ({1 / min(r['times']):.2f} best) over "
            f"{args.rounds}x{args.steps} steps, {r['flops'] / med / 1e9:.1f} GFLOP/s achieved"
        )
    _dump(args.out, {"runs": out, "peaks_gflops": peaks})


# ----------------------------------------------------------------------------- eval
def _restore(workdir: str, config, step=None):
    from diffusion import evaluate, factories, parallel
    from diffusion.checkpoint import Checkpointer

    mesh = parallel.make_mesh()
    model = factories.create_model(config)
    steps = evaluate.checkpoint_steps(workdir, "all")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"no checkpoint at step {step} in {workdir}: {steps}")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        params = evaluate.restore_ema_params(ckpt, step, config, model, mesh)
    finally:
        ckpt.close()
    return model, params, step, mesh


def cmd_eval(args) -> None:
    _apply_cpu_flags()
    import numpy as np

    from diffusion import io
    from diffusion.data import load_split
    from diffusion.evaluation import evaluators, references, settings
    from diffusion.metrics import fid as fid_lib
    from diffusion.metrics import load_inception_params, make_feature_fn

    config = load_config(args.workdir, args.config)
    if args.fid_split:
        config.eval.fid_split = args.fid_split
    out_dir = os.path.join(args.workdir, "sizing")
    os.makedirs(out_dir, exist_ok=True)
    res = {"workdir": args.workdir, "num": args.num, "peaks_gflops": []}

    def peak(where):
        g = _peak_gflops()
        res["peaks_gflops"].append((where, g))
        _log(f"[{where}] matmul peak {g:.1f} GFLOP/s")

    peak("start")
    model, params, step, mesh = _restore(args.workdir, config, args.step)
    res["step"] = step
    t0 = time.perf_counter()
    feature_fn = make_feature_fn(load_inception_params())
    res["inception_load_s"] = time.perf_counter() - t0

    # Inception throughput: compile (first call), then timed batches of 100 (the evaluate batch).
    x = np.zeros((settings.FEATURE_BATCH_SIZE, 16, 16, 3), np.uint8)
    t0 = time.perf_counter()
    np.asarray(feature_fn(x))
    res["inception_compile_plus_batch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    np.asarray(feature_fn(x + 1))
    dt = time.perf_counter() - t0
    res["inception_img_per_s"] = settings.FEATURE_BATCH_SIZE / dt
    _log(
        f"Inception: load {res['inception_load_s']:.1f}s, compile+batch "
        f"{res['inception_compile_plus_batch_s']:.1f}s, {res['inception_img_per_s']:.1f} img/s"
    )

    # Reference: the evaluate code's own (cached in <data_dir>/fid_stats when computed before).
    ref_split = settings.fid_reference_split(config)
    t0 = time.perf_counter()
    ref = references.FidReferences(
        config,
        io.join(args.workdir, "eval"),
        settings.FID_NETWORK,
        settings.FEATURE_BATCH_SIZE,
        lambda: feature_fn,
        lambda stage, t0: None,
    ).load(ref_split)
    res["reference"] = {
        "split": ref_split,
        "n": len(ref.features),
        "s": time.perf_counter() - t0,
        "cache": ref.path,
    }
    _log(
        f"reference {ref_split}: N_ref={len(ref.features)} in {res['reference']['s']:.1f}s "
        f"(cache {ref.path})"
    )

    def score(images, what):
        t0 = time.perf_counter()
        feats = fid_lib.extract_features(
            references.to_rgb(images), feature_fn, batch_size=settings.FEATURE_BATCH_SIZE
        )
        feat_s = time.perf_counter() - t0
        r = evaluators.compute_fid_kid(feats, ref)
        r["features_s"] = feat_s
        r["features_img_per_s"] = len(images) / feat_s
        _log(
            f"  {what}: FID@{r['num_gen']} = {r['fid']:.2f}, KID = {r['kid']:.4f} ± "
            f"{r['kid_se']:.4f} (features {feat_s:.1f}s, {r['features_img_per_s']:.1f} img/s)"
        )
        return r

    # Real-data floor: the same split evaluate uses ('auto': test[:N] when the reference is train).
    floor_split = settings.real_floor_split(config) if config.eval.num_samples == args.num else None
    if floor_split is None:
        other = "test" if config.eval.fid_split.split("[")[0] == "train" else "train"
        floor_split = f"{other}[:{args.num}]"
    if args.floor_fid:
        res["floor"] = {"fid": args.floor_fid, "kid": float("nan"), "split": "given"}
    else:
        real = load_split(
            config.data.dataset,
            floor_split,
            data_dir=config.data.data_dir,
            image_size=config.data.image_size,
        )
        res["floor"] = score(real, f"real floor {floor_split} ({len(real)} images)")
        res["floor"]["split"] = floor_split

    res["samplers"] = {}
    for spec in args.samplers.split(","):
        sampler = parse_sampler(spec, config)[1]
        peak(spec)
        images, comp, run_s = draw(
            make_sample_fn(config, model, params, spec), args.num, args.batch, seed=config.seed
        )
        _log(
            f"{spec}: {args.num} samples, compile {comp:.1f}s, sampling {run_s:.1f}s "
            f"({args.num / run_s:.1f} img/s)"
        )
        r = score(images, spec)
        r.update(
            compile_s=comp,
            sample_s=run_s,
            sampler=dataclasses.asdict(sampler),
            fid_over_floor=r["fid"] / res["floor"]["fid"],
        )
        res["samplers"][spec] = r
        np.savez_compressed(
            os.path.join(out_dir, f"samples_{spec.replace(':', '_')}_n{args.num}.npz"),
            images=images,
        )
        io.save_image_grid(images[:64], os.path.join(out_dir, f"grid_{spec.replace(':', '_')}.png"))
        _dump(os.path.join(out_dir, f"eval_step{step}_n{args.num}{args.tag}.json"), res)

    if args.bpd_examples:
        peak("bpd")
        images = load_split(
            config.data.dataset,
            f"{config.eval.bpd_split}[:{args.bpd_examples}]",
            data_dir=config.data.data_dir,
            image_size=config.data.image_size,
        )
        config.eval.batch_size = max(config.eval.batch_size, args.bpd_examples)
        t0 = time.perf_counter()
        b = evaluators.compute_bpd(config, model, params, images, mesh=mesh)
        res["bpd"] = {
            "total": b["total"],
            "se": b["total_se"],
            "n": len(images),
            "s": time.perf_counter() - t0,
        }
        _log(
            f"bits/dim {b['total']:.3f} ± {b['total_se']:.3f} on {len(images)} examples in "
            f"{res['bpd']['s']:.1f}s (compile included)"
        )
    peak("end")
    _dump(os.path.join(out_dir, f"eval_step{step}_n{args.num}{args.tag}.json"), res)

    _log("\nsampler | compile s | sample s | FID | KID | FID/floor")
    for spec, r in res["samplers"].items():
        _log(
            f"{spec} | {r['compile_s']:.1f} | {r['sample_s']:.1f} | {r['fid']:.2f} | "
            f"{r['kid']:.4f} | {r['fid_over_floor']:.2f}"
        )
    _log(
        f"floor {res['floor']['split']} | | | {res['floor']['fid']:.2f} | "
        f"{res['floor']['kid']:.4f} | 1.00"
    )


# ----------------------------------------------------------------------------- grid
def cmd_grid(args) -> None:
    _apply_cpu_flags()
    from diffusion import io

    config = load_config(args.workdir, args.config)
    model, params, step, _ = _restore(args.workdir, config, args.step)
    images, comp, run_s = draw(
        make_sample_fn(config, model, params, args.sampler),
        args.num,
        args.num,
        seed=args.seed,
    )
    io.save_image_grid(images, args.out)
    _log(
        f"wrote {args.out}: {args.num} samples, {args.sampler}, step {step} "
        f"(compile {comp:.1f}s, sampling {run_s:.1f}s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("peak", help="matmul peak of the hour")
    t = sub.add_parser("train", help="train a candidate with launch.py and time it")
    t.add_argument("--workdir", required=True)
    t.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist5k.py"))
    t.add_argument("overrides", nargs="*", help="--config.* overrides (after --)")
    st = sub.add_parser("steps", help="train-step speed of candidates, interleaved")
    st.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist5k.py"))
    st.add_argument("--steps", type=int, default=10)
    st.add_argument("--rounds", type=int, default=3)
    st.add_argument("--out", default="/tmp/sizing/steps.json")
    st.add_argument(
        "candidates",
        nargs="+",
        help="NAME:section.field=value;... (python literals), e.g. "
        "'A:data.image_size=16;model.ch_mult=(1,2,2)'",
    )
    e = sub.add_parser("eval", help="samplers x FID/KID + floor + costs")
    e.add_argument("--workdir", required=True)
    e.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist5k.py"))
    e.add_argument("--num", type=int, default=256)
    e.add_argument("--batch", type=int, default=128)
    e.add_argument("--samplers", default="ancestral:50")
    e.add_argument("--fid_split", default=None, help="override config.eval.fid_split")
    e.add_argument("--bpd_examples", type=int, default=0)
    e.add_argument(
        "--floor_fid",
        type=float,
        default=None,
        help="skip the real-data floor and use this FID (from an earlier run)",
    )
    e.add_argument("--tag", default="", help="suffix of the result JSON")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    g = sub.add_parser("grid", help="a sample grid PNG")
    g.add_argument("--workdir", required=True)
    g.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist5k.py"))
    g.add_argument("--sampler", default="ddim:50")
    g.add_argument("--num", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--step", type=int, default=None)
    g.add_argument("--out", default="/tmp/sizing/grid.png")
    args = ap.parse_args()
    {"peak": cmd_peak, "train": cmd_train, "steps": cmd_steps, "eval": cmd_eval, "grid": cmd_grid}[
        args.cmd
    ](args)


if __name__ == "__main__":
    main()
