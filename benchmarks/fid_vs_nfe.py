"""FID against the number of network calls (NFE) for every registered sampler (issue 33).

One command, from a trained workdir (default: the main job's ``workdirs/mnist5k``)::

    python -m benchmarks.fid_vs_nfe                       # NFE 5,10,20,50,100 and T, every sampler
    python -m benchmarks.fid_vs_nfe --workdir DIR --config experiments/mnist5k.py \\
        --methods ddim,dpmpp_2m --nfe 10,20 --out DIR/fid_vs_nfe

Each (sampler, NFE) point is one ``--mode evaluate`` of the workdir's newest checkpoint
(`diffusion.evaluate.run`) with ``config.sample.method`` and the ``num_steps`` whose NFE is the
largest not above the target (`Sampler.steps_for_nfe`; Heun: 2K − 1 calls) and the bound turned
off, so N, the FID reference, the real-data floor and the sample keys are the main job's
evaluation's. The NFE = T point of the ancestral sampler is the full T-step chain (``num_steps =
0``). Each point runs in its own directory ``<out>/<tag>/`` (the checkpoint copied in, the
workdir's ``eval/real_floor.json`` too so the floor is not re-measured), so an interrupted run
resumes: finished points are read back from ``<out>/fid_vs_nfe.json``, which is rewritten after
each point. At the end it prints the table (markdown, for the README), the fewest NFE at which
each sampler is within 10 % of its own NFE-T FID, and writes the figure (``--figure``, default
``docs/figures/fid_vs_nfe.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_NFE = (5, 10, 20, 50, 100)


def point_config(config, method: str, nfe: int):
    """A copy of ``config`` sampling with ``method`` at (at most) ``nfe`` network calls, with the
    bound off; ``nfe = T`` is each method's T-call chain (ancestral: the full chain)."""
    from diffusion import samplers

    c = config.copy_and_resolve_references()
    T = c.diffusion.num_timesteps
    c.sample.method = method
    c.sample.eta = 0.0 if not samplers.get(method).uses_eta else c.sample.eta
    k = samplers.get(method).steps_for_nfe(nfe, T)
    c.sample.num_steps = 0 if (method == "ancestral" and k >= T) else min(k, T)
    c.eval.bpd_num_examples = 0
    c.eval.checkpoints = "latest"
    return c


def _prepare(workdir: str, point_dir: str) -> None:
    """``point_dir`` with a copy of the workdir's newest checkpoint and its real-floor record."""
    from diffusion.evaluate import checkpoint_steps

    step = checkpoint_steps(workdir, "latest")[-1]
    src = os.path.join(workdir, "checkpoints", str(step))
    dst = os.path.join(point_dir, "checkpoints", str(step))
    if not os.path.isdir(dst):
        shutil.copytree(src, dst)
    floor = os.path.join(workdir, "eval", "real_floor.json")
    if os.path.isfile(floor) and not os.path.isfile(
        os.path.join(point_dir, "eval", "real_floor.json")
    ):
        os.makedirs(os.path.join(point_dir, "eval"), exist_ok=True)
        shutil.copy(floor, os.path.join(point_dir, "eval", "real_floor.json"))


def _load(path: str) -> dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {"points": {}}


def _save(path: str, res: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run_point(config, workdir: str, out: str, method: str, nfe: int, feature_fn=None) -> dict:
    """Evaluates one (method, NFE) point; returns its record."""
    from diffusion import evaluate, samplers

    c = point_config(config, method, nfe)
    spec = samplers.spec_from_config(c)
    T = c.diffusion.num_timesteps
    tag = samplers.tag(spec, T)
    point_dir = os.path.join(out, tag)
    _prepare(workdir, point_dir)
    t0 = time.time()
    kw = {} if feature_fn is None else {"feature_fn": feature_fn, "feature_network": "custom"}
    entry = next(iter(evaluate.run(c, point_dir, mode="evaluate", **kw).values()))
    floor_path = os.path.join(point_dir, "eval", "real_floor.json")
    floor = None
    if os.path.isfile(floor_path):
        with open(floor_path) as f:
            floor = json.load(f)
    return {
        "method": method,
        "target_nfe": nfe,
        "nfe": samplers.nfe(spec, T),
        "num_steps": spec.num_steps,
        "tag": tag,
        "describe": samplers.describe(spec, T),
        "fid": entry["fid"]["value"],
        "num_gen": entry["fid"]["num_gen"],
        "num_ref": entry["fid"]["num_ref"],
        "kid": entry["kid"]["mean"],
        "kid_se": entry["kid"]["se"],
        "floor_fid": None if floor is None else floor.get("fid"),
        "wall_s": time.time() - t0,
    }


def summarize(res: dict, methods, nfes, T: int) -> str:
    """The markdown table (FID by sampler and target NFE, the floor beside it) and, per
    sampler, the fewest NFE within 10 % of its own NFE-T FID."""
    pts = res["points"]
    cols = list(nfes) + [T]
    lines = [
        "| sampler | " + " | ".join(f"NFE {n}" for n in cols) + " | fewest NFE within 10 % of NFE "
        f"{T} |",
        "|---|" + "---:|" * len(cols) + "---:|",
    ]
    floor = next((p["floor_fid"] for p in pts.values() if p.get("floor_fid")), None)
    for m in methods:
        row = {p["target_nfe"]: p for p in pts.values() if p["method"] == m}
        cells = [
            f"{row[n]['fid']:.2f}" + ("" if row[n]["nfe"] == n else f" ({row[n]['nfe']})")
            if n in row
            else "–"
            for n in cols
        ]
        limit = row.get(T, {}).get("fid")
        within = [
            row[n]["nfe"] for n in sorted(row) if limit is not None and row[n]["fid"] <= 1.1 * limit
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {min(within) if within else '–'} |")
    n_gen = next((p["num_gen"] for p in pts.values()), None)
    lines.append("")
    lines.append(
        f"FID@{n_gen} (N_gen = {n_gen}); a value in parentheses is the NFE actually used "
        f"(Heun: 2K − 1). Real-data floor at the same N and reference: "
        + ("–" if floor is None else f"{floor:.2f}")
    )
    return "\n".join(lines)


def plot(res: dict, methods, T: int, path: str) -> None:
    """FID against NFE (log x), one line per sampler, the floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusion import io

    pts = res["points"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
        row = sorted((p["nfe"], p["fid"]) for p in pts.values() if p["method"] == m)
        if row:
            ax.plot(*zip(*row), marker="o", label=m)
    floor = next((p["floor_fid"] for p in pts.values() if p.get("floor_fid")), None)
    if floor is not None:
        ax.axhline(floor, color="grey", ls="--", label="real-data floor")
    n_gen = next((p["num_gen"] for p in pts.values()), "?")
    ax.set(xscale="log", yscale="log", xlabel="network calls per sample (NFE)")
    ax.set_ylabel(f"FID@{n_gen}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "mnist5k"))
    ap.add_argument("--config", default=os.path.join(ROOT, "experiments", "mnist5k.py"))
    ap.add_argument("--methods", default=None, help="comma list (default: every registered)")
    ap.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFE)), help="target NFEs; T added")
    ap.add_argument("--no_full", action="store_true", help="skip the NFE = T points")
    ap.add_argument("--out", default=None, help="default: <workdir>/fid_vs_nfe")
    ap.add_argument("--figure", default=os.path.join(ROOT, "docs", "figures", "fid_vs_nfe.png"))
    ap.add_argument(
        "--fake_features", action="store_true", help="smoke tests: a 4x4 mean-pool, not Inception"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from benchmarks.main_job_sizing import load_config
    from diffusion import samplers

    config = load_config(args.workdir, args.config)
    T = config.diffusion.num_timesteps
    methods = args.methods.split(",") if args.methods else sorted(samplers.SAMPLERS)
    nfes = [int(n) for n in args.nfe.split(",") if n]
    targets = nfes + ([] if args.no_full else [T])
    out = args.out or os.path.join(args.workdir, "fid_vs_nfe")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "fid_vs_nfe.json")
    res = _load(path)
    feature_fn = None
    if args.fake_features:
        import numpy as np

        def feature_fn(images):
            x = np.asarray(images, np.float32) / 255.0
            b, h, w, _ = x.shape
            return x.reshape(b, 4, h // 4, 4, w // 4, 3).mean((2, 4)).reshape(b, -1)

    for m in methods:
        for n in targets:
            key = f"{m}@{n}"
            if key in res["points"]:
                logging.info("%s: done before (FID %.3f)", key, res["points"][key]["fid"])
                continue
            logging.info("=== %s ===", key)
            res["points"][key] = run_point(config, args.workdir, out, m, n, feature_fn)
            _save(path, res)
            print(f"{key}: {res['points'][key]['describe']}: FID {res['points'][key]['fid']:.3f}")
    table = summarize(res, methods, nfes, T)
    print(table)
    with open(os.path.join(out, "fid_vs_nfe.md"), "w") as f:
        f.write(table + "\n")
    if args.figure:
        plot(res, methods, T, args.figure)
        print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
