"""Offline reproduction of the paper's Table 2 ablation and its figures, in one command.

    python -m experiments.reproduce --out results/offline            # 6 paper rows + 2nd seeds
    python -m experiments.reproduce --out results/offline --rows eps_simple,v_simple --seeds 0,1
    python -m experiments.reproduce --out results/offline --set training.num_train_steps=3000

Each run (a Table 2 row of `experiments/ablation.py` at the offline scale, with a seed) trains in
``<out>/runs/<row>_seed<seed>`` (`diffusion.training.train`), then is evaluated there
(`diffusion.evaluate.run`: FID and KID of N samples from the full T-step chain, bits/dim of the
full bound on test digits). A run whose loss or gradients go non-finite is marked diverged and
its last good checkpoint (if any) is evaluated. A finished run writes ``summary.json``; a
relaunch skips finished runs and resumes an unfinished one from its newest checkpoint and its
stored evaluation results, so the reproduction is resumable run by run.

At the end it writes to ``<out>``:
  ``table.md``          the measured table beside the paper's Table 2 (per run and mean over seeds)
  ``results.json``      every run's summary and the settings
  ``samples_<run>.png`` 64 of each run's evaluation samples
  ``rate_distortion.png``  rate (bits/dim) and distortion (RMSE, 0–255) against reverse time
                        (paper Fig. 5 / Table 4) from the bound of the first ε/L_simple run
  ``progressive.png``   x̂_0 predicted along one reverse chain (paper Fig. 6)
  ``interpolation.png`` test digits mixed in the latent x_t and decoded (paper Fig. 8), for
                        t = 100, 250 and 500 (top to bottom)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from diffusion import io, rng
from experiments import ablation

# Ho et al. 2020, Table 2 (CIFAR10, IS / FID; None = "unstable" in the paper) and Table 1 NLL.
PAPER_TABLE2 = {
    "xprev_L_learned": (7.28, 23.69),
    "xprev_L_fixed": (8.06, 13.22),
    "xprev_mse": None,
    "eps_L_learned": None,
    "eps_L_fixed": (7.67, 13.51),
    "eps_simple": (9.46, 3.17),
}
PAPER_NLL = {"eps_L_fixed": 3.70, "eps_simple": 3.75}
DESCRIPTIONS = {
    "xprev_L_learned": "μ̃, L, learned diagonal Σ",
    "xprev_L_fixed": "μ̃, L, fixed isotropic Σ",
    "xprev_mse": "μ̃, ‖μ̃ − μ̃θ‖², fixed Σ",
    "eps_L_learned": "ε, L, learned diagonal Σ",
    "eps_L_fixed": "ε, L, fixed isotropic Σ",
    "eps_simple": "ε, L_simple, fixed Σ",
    "xstart_simple": "x0, unweighted MSE, fixed Σ",
    "v_simple": "v, unweighted MSE, fixed Σ",
    "cosine_eps_simple": "ε, L_simple, fixed Σ, cosine schedule",
    "hybrid_learned_range": "ε, L_hybrid, learned-range Σ",
    "eps_L_fixed_is": "ε, L, fixed Σ, t importance-sampled",
}
# The default plan: every paper row with seed 0, and a second seed for the two rows the
# paper's Tables 1 and 2 compare most (ε with L_simple against ε with the true bound L).
DEFAULT_RUNS = tuple(f"{r}@0" for r in ablation.PAPER_ROWS) + ("eps_simple@1", "eps_L_fixed@1")
# Fig. 8 uses t = 500 on 256×256 faces; a 16×16 digit keeps far less at t = 500, so smaller t
# are drawn too (the paper's Fig. 9 shows how the interpolation coarsens as t grows).
INTERPOLATION_TS = (100, 250, 500)


def parse_runs(spec: str) -> List[Tuple[str, int]]:
    """``'eps_simple@0,eps_simple@1'`` (or ``'paper'`` for `DEFAULT_RUNS`) -> [(row, seed)]."""
    items = DEFAULT_RUNS if spec.strip() == "paper" else [s for s in spec.split(",") if s.strip()]
    runs = []
    for item in items:
        row, _, seed = item.strip().partition("@")
        if row not in ablation.ROWS:
            raise ValueError(f"unknown row {row!r} in --runs; valid rows: {sorted(ablation.ROWS)}")
        try:
            runs.append((row, int(seed or 0)))
        except ValueError:
            raise ValueError(f"bad seed in {item!r}; write ROW@SEED, e.g. eps_simple@1") from None
    if not runs:
        raise ValueError("no runs chosen")
    return runs


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``['training.num_train_steps=300', 'eval.num_samples=64']`` -> {dotted key: value}; values
    are read as Python literals when they parse as one (numbers, tuples, booleans), else strings."""
    import ast

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: write GROUP.FIELD=VALUE, e.g. training.lr=2e-4")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def run_config(row: str, seed: int, overrides: Dict[str, Any], data_dir: Optional[str] = None):
    """The offline-scale config of ``row`` with ``seed`` and the dotted ``overrides`` applied."""
    config = ablation.get_config(f"row={row},scale=offline")
    config.seed = int(seed)
    if data_dir:
        config.data.data_dir = data_dir
    from diffusion.samplers import REMOVED_FIELDS

    for key, value in overrides.items():
        # Summaries written before the sampler spec may name a removed field: use its successor.
        *parents, field = REMOVED_FIELDS.get(key, key).split(".")
        node = config
        for part in parents:
            node = node.get(part) if hasattr(node, "get") else None
        if node is None or not hasattr(node, "keys") or field not in node:
            raise ValueError(f"--set {key}: no such config field")
        node[field] = value
    return config


def _final_loss(workdir: str) -> Optional[float]:
    lines = io.read_jsonl(io.join(workdir, "metrics.jsonl"))
    return float(lines[-1]["loss"]) if lines else None


def _settings(config) -> Dict[str, Any]:
    from diffusion.factories import config_to_dict

    return config_to_dict(config)


def run_one(
    row: str,
    seed: int,
    out_dir: str,
    overrides: Dict[str, Any],
    *,
    data_dir: Optional[str] = None,
    feature_fn: Optional[Callable] = None,
    feature_network: Optional[str] = None,
) -> Dict[str, Any]:
    """Trains and evaluates one (row, seed) in ``<out_dir>/runs/<row>_seed<seed>``, or returns its
    stored ``summary.json`` when the run already finished with the same config."""
    from diffusion import evaluate, training
    from diffusion.checkpoint import Checkpointer

    name = f"{row}_seed{seed}"
    workdir = io.absolute(io.join(out_dir, "runs", name))
    summary_path = io.join(workdir, "summary.json")
    config = run_config(row, seed, overrides, data_dir)
    settings = _settings(config)
    summary = io.read_json(summary_path, default=None)
    if summary is not None:
        if summary.get("config") == settings:
            logging.info("%s: finished before, skipping (%s)", name, summary_path)
            summary["skipped"] = True
            return summary
        logging.warning("%s: summary.json was made with another config; running again", name)
    io.makedirs(workdir)
    t0 = time.time()
    diverged, message = False, None
    try:
        training.train(config, workdir)
    except training.NonFiniteError as e:
        diverged, message = True, str(e)
        logging.warning("%s diverged: %s", name, e)
    train_s = time.time() - t0
    ckpt = Checkpointer(io.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    ckpt.close()
    results: Dict[str, Any] = {}
    t1 = time.time()
    if step is not None:
        results = evaluate.run(
            config, workdir, mode="evaluate", feature_fn=feature_fn, feature_network=feature_network
        ).get(step, {})
    summary = {
        "row": row,
        "seed": seed,
        "run": name,
        "description": DESCRIPTIONS.get(row, row),
        "mean_type": config.diffusion.mean_type,
        "loss_type": config.diffusion.loss_type,
        "var_type": config.diffusion.var_type,
        "beta_schedule": config.diffusion.beta_schedule,
        "num_train_steps": config.training.num_train_steps,
        "evaluated_step": step,
        "diverged": diverged,
        "divergence": message,
        "final_loss": _final_loss(workdir),
        "fid": results.get("fid"),
        "kid": results.get("kid"),
        "bpd": results.get("bpd"),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.time() - t1, 1),
        "workdir": workdir,
        "overrides": overrides,
        "data_dir": data_dir,
        "config": settings,
    }
    io.write_json(summary_path, summary, indent=1)
    return summary


# ----------------------------------------------------------------------------- table
def _fmt(x, spec=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _metrics(s: Dict[str, Any]) -> Dict[str, Optional[float]]:
    fid, kid, bpd = s.get("fid") or {}, s.get("kid") or {}, s.get("bpd") or {}
    return {
        "fid": fid.get("value"),
        "kid": kid.get("mean"),
        "kid_se": kid.get("se"),
        "bpd": bpd.get("total"),
        "bpd_se": bpd.get("total_se"),
        "loss": s.get("final_loss"),
    }


def markdown_table(summaries: List[Dict[str, Any]]) -> str:
    """The measured runs beside the paper's Table 2, then the mean ± s.d. over seeds per row."""
    n_gen = next((s["fid"]["num_gen"] for s in summaries if s.get("fid")), None)
    n_ref = next((s["fid"]["num_ref"] for s in summaries if s.get("fid")), None)
    n_bpd = next((s["bpd"]["num_examples"] for s in summaries if s.get("bpd")), None)
    chain = next(
        ((s["fid"].get("settings") or {}).get("chain") for s in summaries if s.get("fid")), None
    )
    lines = [
        f"FID@{n_gen} and KID: N_gen = {n_gen} samples ({chain} chain) against "
        f"N_ref = {n_ref} training digits; bits/dim: full bound on {n_bpd} test digits "
        "(± s.e. over digits). Paper: CIFAR10, 800k steps, FID@50k.",
        "",
        "| run | parameterisation, objective, Σ | steps | diverged | final loss | "
        f"FID@{n_gen} | KID ×10³ | NLL bits/dim | paper IS / FID |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        m = _metrics(s)
        paper = PAPER_TABLE2.get(s["row"], "n/a")
        paper = (
            "unstable"
            if paper is None
            else (paper if isinstance(paper, str) else f"{paper[0]:.2f} / {paper[1]:.2f}")
        )
        kid = "–" if m["kid"] is None else f"{1e3 * m['kid']:.1f} ± {1e3 * m['kid_se']:.1f}"
        bpd = "–" if m["bpd"] is None else f"{m['bpd']:.3f} ± {m['bpd_se']:.3f}"
        step = s.get("evaluated_step")
        steps = f"{step}/{s['num_train_steps']}" if step != s["num_train_steps"] else str(step)
        lines.append(
            f"| {s['run']} | {s['description']} | {steps} | "
            f"{'**yes**' if s['diverged'] else 'no'} | {_fmt(m['loss'], '.4f')} | "
            f"{_fmt(m['fid'], '.1f')} | {kid} | {bpd} | {paper} |"
        )
    by_row: Dict[str, List[Dict[str, Any]]] = {}
    for s in summaries:
        by_row.setdefault(s["row"], []).append(s)
    multi = {r: v for r, v in by_row.items() if len(v) > 1}
    if multi:
        lines += [
            "",
            "Mean ± s.d. over seeds:",
            "",
            f"| row | seeds | diverged | FID@{n_gen} | KID ×10³ | NLL bits/dim |",
            "|---|---|---|---|---|---|",
        ]
        for row, runs in multi.items():
            cells = []
            for key, scale, spec in (("fid", 1, ".1f"), ("kid", 1e3, ".1f"), ("bpd", 1, ".3f")):
                v = [_metrics(s)[key] for s in runs if _metrics(s)[key] is not None]
                cells.append(
                    "–"
                    if not v
                    else f"{format(scale * np.mean(v), spec)} ± "
                    f"{format(scale * np.std(v, ddof=1) if len(v) > 1 else 0.0, spec)}"
                )
            lines.append(
                f"| {row} | {','.join(str(s['seed']) for s in runs)} | "
                f"{sum(s['diverged'] for s in runs)}/{len(runs)} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def _restore(summary: Dict[str, Any]):
    """(config, model, schedule, EMA params) of a finished run."""
    from diffusion import evaluate, factories, parallel
    from diffusion.checkpoint import Checkpointer

    config = run_config(summary["row"], summary["seed"], summary["overrides"], summary["data_dir"])
    mesh = parallel.make_mesh()
    model = factories.create_model(config)
    ckpt = Checkpointer(io.join(summary["workdir"], "checkpoints"), async_save=False)
    try:
        params = evaluate.restore_ema_params(ckpt, summary["evaluated_step"], config, model, mesh)
    finally:
        ckpt.close()
    return config, model, factories.schedule_from_config(config), params


def plot_rate_distortion(bpd: Dict[str, Any], path: str, title: str) -> Dict[str, float]:
    """Fig. 5: rate (bits/dim received so far) and distortion (RMSE of the clipped x̂_0 on 0–255)
    against reverse-process time, from the per-t bound terms of an evaluation (Table 4 split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = np.asarray(bpd["terms_bpd"], np.float64)
    T = len(terms)
    rate = np.cumsum(terms[::-1])[::-1] - terms + bpd["prior"]  # after receiving x_t
    rmse = np.sqrt(np.asarray(bpd.get("mse_clipped", bpd["mse"]), np.float64)) * 127.5
    rev = T - np.arange(T)  # reverse-process time: 1 at t = T−1 ... T at t = 0
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    ax[0].plot(rev, rmse)
    ax[0].set_xlabel("reverse process steps (T − t)")
    ax[0].set_ylabel("distortion (RMSE, [0, 255])")
    ax[1].plot(rev, rate)
    ax[1].set_xlabel("reverse process steps (T − t)")
    ax[1].set_ylabel("rate (bits/dim)")
    ax[2].plot(rate, rmse)
    ax[2].set_xlabel("rate (bits/dim)")
    ax[2].set_ylabel("distortion (RMSE)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    io.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return {
        "rate": float(bpd["rate"]),
        "distortion": float(bpd["distortion"]),
        "rmse_at_t0": float(rmse[0]),
    }


def _grid(rows: np.ndarray) -> np.ndarray:
    """uint8 [R, C, H, W, ch] -> one image [R(H+2)+2, C(W+2)+2, ch] with white borders."""
    r, c, h, w, ch = rows.shape
    out = np.full((r * (h + 2) + 2, c * (w + 2) + 2, ch), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            out[2 + i * (h + 2) : 2 + i * (h + 2) + h, 2 + j * (w + 2) : 2 + j * (w + 2) + w] = (
                rows[i, j]
            )
    return out


def _save_png(img: np.ndarray, path: str, scale: int = 3) -> None:
    io.write_png(path, img, scale=scale)


def plot_progressive(
    summary: Dict[str, Any], path: str, *, num: int = 8, columns: int = 10
) -> None:
    """Fig. 6: x̂_0 predicted from x_t along single reverse chains, t = T−T/columns ... 0."""
    import jax

    from diffusion import factories, samplers, sampling

    config, model, schedule, params = _restore(summary)
    T, size = config.diffusion.num_timesteps, config.data.image_size
    every = T // columns
    # Fig. 6 is the paper's chain whatever config.sample says: an explicit override.
    spec = samplers.spec_from_config(config, method="ancestral", num_steps=0, clip_denoised=True)
    fn = jax.jit(
        lambda key: (
            samplers.draw(
                spec,
                schedule,
                factories.make_denoise_fn(model, params),
                (num, size, size, config.data.channels),
                key,
                factories.parameterization(config),
                progressive_every=every,
            ).progressive
        )
    )
    key = jax.random.key(config.seed + rng.FIG6_SEED_OFFSET)
    prog = np.asarray(sampling.to_uint8(fn(key)))  # [n, B, H, W, C]
    _save_png(_grid(np.transpose(prog, (1, 0, 2, 3, 4))), path)


def plot_interpolation(
    summary: Dict[str, Any],
    path: str,
    *,
    pairs: int = 3,
    ts: Sequence[int] = INTERPOLATION_TS,
    num_lambdas: int = 9,
) -> None:
    """Fig. 8 (and Fig. 9's dependence on t): pairs of test digits, each noised to x_t by its
    own draw from q(x_t|x_0) (as the paper), mixed linearly in x_t (λ = 0 … 1) and decoded by the reverse chain from t; one block
    of ``pairs`` rows per t in ``ts`` (top to bottom), first/last columns the source digits."""
    import jax

    from diffusion import factories, sampling
    from diffusion.data import load_split, normalize_images

    config, model, schedule, params = _restore(summary)
    d = config.diffusion
    imgs = load_split(
        config.data.dataset,
        f"test[:{2 * pairs}]",
        data_dir=config.data.data_dir,
        image_size=config.data.image_size,
    )
    x = normalize_images(imgs)
    lambdas = np.linspace(0.0, 1.0, num_lambdas)
    blocks = []
    for t in ts:
        t = min(int(t), d.num_timesteps - 1)
        fn = jax.jit(
            lambda a, b, key, t=t: sampling.interpolate(
                schedule,
                factories.make_denoise_fn(model, params),
                a,
                b,
                lambdas,
                t,
                key,
                mean_type=d.mean_type,
                var_type=d.var_type,
                clip_denoised=True,
            )
        )
        out = np.asarray(
            sampling.to_uint8(
                fn(x[:pairs], x[pairs:], jax.random.key(config.seed + rng.FIG8_SEED_OFFSET))
            )
        )
        blocks.append(
            np.concatenate(
                [imgs[:pairs, None], np.transpose(out, (1, 0, 2, 3, 4)), imgs[pairs:, None]], axis=1
            )
        )  # [pairs, L + 2, H, W, C]
    _save_png(_grid(np.concatenate(blocks)), path)


def _sample_grid(summary: Dict[str, Any], path: str) -> bool:
    eval_dir = io.join(summary["workdir"], "eval")
    files = (
        [f for f in io.listdir(eval_dir) if f.startswith("samples_") and f.endswith(".npz")]
        if io.isdir(eval_dir)
        else []
    )
    if not files:
        return False
    images = io.read_npz(io.join(eval_dir, files[-1]), keys=["images"])["images"][:64]
    n = len(images)
    cols = int(math.ceil(math.sqrt(n)))
    pad = cols * cols - n
    if pad:
        images = np.concatenate([images, np.full((pad,) + images.shape[1:], 255, np.uint8)])
    _save_png(_grid(images.reshape((cols, cols) + images.shape[1:])), path)
    return True


# ----------------------------------------------------------------------------- driver
def reproduce(
    runs: Sequence[Tuple[str, int]],
    out_dir: str,
    overrides: Optional[Dict] = None,
    *,
    data_dir: Optional[str] = None,
    feature_fn: Optional[Callable] = None,
    feature_network: Optional[str] = None,
    figures: bool = True,
) -> Dict[str, Any]:
    """Runs every (row, seed) in order (skipping finished ones), then writes the table, JSON and
    figures to ``out_dir``. Returns the content of ``results.json``."""
    overrides = dict(overrides or {})
    io.makedirs(out_dir)
    t0 = time.time()
    summaries = []
    for i, (row, seed) in enumerate(runs):
        logging.info("===== run %d/%d: %s seed %d =====", i + 1, len(runs), row, seed)
        summaries.append(
            run_one(
                row,
                seed,
                out_dir,
                overrides,
                data_dir=data_dir,
                feature_fn=feature_fn,
                feature_network=feature_network,
            )
        )
    figs: Dict[str, Any] = {}
    if figures:
        for s in summaries:
            if _sample_grid(s, io.join(out_dir, f"samples_{s['run']}.png")):
                figs.setdefault("samples", []).append(f"samples_{s['run']}.png")
        main = next(
            (s for s in summaries if s["row"] == "eps_simple" and s.get("evaluated_step")),
            next((s for s in summaries if s.get("evaluated_step")), None),
        )
        if main is not None:
            if main.get("bpd"):
                figs["rate_distortion"] = plot_rate_distortion(
                    main["bpd"],
                    io.join(out_dir, "rate_distortion.png"),
                    f"{main['run']}: rate–distortion on {main['bpd']['num_examples']} test digits",
                )
            plot_progressive(main, io.join(out_dir, "progressive.png"))
            plot_interpolation(main, io.join(out_dir, "interpolation.png"))
            figs["from_run"] = main["run"]
    wall = {s["run"]: s["train_seconds"] + s["eval_seconds"] for s in summaries}
    result = {
        "runs": [{k: v for k, v in s.items() if k != "config"} for s in summaries],
        "overrides": overrides,
        "figures": figs,
        "seconds_this_invocation": round(time.time() - t0, 1),
        "seconds_all_runs": round(sum(wall.values()), 1),
        "paper_table2": PAPER_TABLE2,
    }
    io.write_text(io.join(out_dir, "table.md"), markdown_table(summaries))
    io.write_json(io.join(out_dir, "results.json"), result, indent=1)
    logging.info("Wrote %s/table.md and results.json:\n%s", out_dir, markdown_table(summaries))
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/offline", help="results folder (runs/ inside)")
    p.add_argument(
        "--runs",
        default="paper",
        help="ROW@SEED,... or 'paper' (the default plan: " + ", ".join(DEFAULT_RUNS) + ")",
    )
    p.add_argument("--rows", default=None, help="ROW,... (with --seeds; overrides --runs)")
    p.add_argument("--seeds", default="0", help="seeds for --rows, e.g. 0,1")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="GROUP.FIELD=VALUE",
        help="override a config field of every run (repeatable)",
    )
    p.add_argument("--data_dir", default=None)
    p.add_argument("--no_figures", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from diffusion import cpu_runtime, quiet_logs

    quiet_logs.install()
    cpu_runtime.apply_xla_cpu_flags()  # before JAX starts its backend
    cpu_runtime.keep_freed_memory()  # DDPM_KEEP_FREED_MEMORY (unset: 0)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    if a.rows:
        runs = parse_runs(
            ",".join(f"{r}@{s}" for r in a.rows.split(",") for s in a.seeds.split(","))
        )
    else:
        runs = parse_runs(a.runs)
    reproduce(runs, a.out, parse_overrides(a.set), data_dir=a.data_dir, figures=not a.no_figures)


if __name__ == "__main__":
    main()
