"""Evaluation mode: samples → FID / KID, bits/dim from the full bound, over one or all checkpoints.

``launch.py --mode evaluate`` calls ``run(config, workdir, mode="evaluate")``; ``--mode sample``
calls ``run(..., mode="sample")``. For every checkpoint step chosen by ``config.eval.checkpoints``
(``'latest'``: the newest; ``'all'``: every step on disk, ascending) the EMA parameters are
restored and:

1. ``config.eval.num_samples`` (N) samples are drawn with the full T-step ancestral chain
   (``config.eval.sample_steps = 0``) or a respaced K-step chain (K > 0), in global batches of
   ``config.eval.batch_size`` sharded over all devices (`sampling.sample_in_batches`), and saved as
   uint8 ``.npz`` plus a grid PNG, so an interrupted evaluation reuses them.
2. FID and KID (mean ± s.e.) of those samples against the FID-Inception statistics of
   ``config.data.dataset`` / ``config.eval.fid_split`` (the whole split, or its first
   `DEFAULT_FID_NUM_REFERENCE` = 50,000 images when larger: pass a sliced split such as
   ``'train[:10000]'`` to choose another N_ref). Reference statistics are cached in
   ``<data_dir>/fid_stats/<network>/`` (falling back to ``<workdir>/eval/fid_stats/<network>/``
   when the data dir is not writable). Grayscale images are repeated to 3 channels. Every FID is
   reported with its N ("FID@1000 = 23.4 (N_gen=1000, N_ref=4500)"): FID is strongly biased at
   small N, so compare only at equal N. The Inception Score is not available: the FID Inception
   network has no logits layer.
3. bits/dim from the full variational bound (`likelihood.bits_per_dim`, T network calls per
   example) on the first ``config.eval.bpd_num_examples`` examples of ``config.eval.bpd_split``:
   total (± s.e.), prior, rate / distortion (paper Table 4), and the mean per-t terms and per-t
   mse of x̂_0 (the rate–distortion curve of Fig. 5) as lists indexed by the code index t.

Results go to ``<workdir>/eval/results.json`` keyed by step and rewritten atomically after each
metric; each metric stores the settings it was computed with, and a metric whose settings match
the current config is not recomputed (so a rerun skips finished steps, and an interrupted one
loses at most the metric in progress). Scalars also go to TensorBoard in ``<workdir>/eval``.
``num_samples = 0`` skips FID/KID, ``bpd_num_examples = 0`` skips bits/dim.

Files under ``<workdir>/eval/``::

    results.json                                   all metrics, keyed by step
    samples_step_<step>_n<N>_<chain>[_pI].npz      uint8 samples ('images') of evaluate mode
    samples_step_<step>_n<N>_<chain>.png           grid of the first 64 of them
    features_step_<step>_n<N>_<chain>.npz          their Inception features (reused on resume)
    samples_step_<step>.png / .npz                 sample mode: a grid of num_grid_samples
    events.out.tfevents.*                          TensorBoard scalars and images

``<step>`` is zero-padded to 8 digits (as ``samples/step_*.png`` of training); ``<chain>`` is
``full<T>`` or ``respaced<K>``; ``_pI`` marks process I's share in a multi-process run.

Multi-process runs: every process restores the state and samples its share on the global mesh;
Inception features are extracted per process and all-gathered, then every process computes the
same metrics (reference statistics are computed once per process and cached); process 0 writes
results.json, PNGs and TensorBoard.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import io, likelihood, parallel, sampling
from diffusion.checkpoint import Checkpointer, abstract_like
from diffusion.config_check import ConfigError, incompatible_fields, validate_config
from diffusion.metrics import fid as fid_lib

__all__ = ["run", "checkpoint_steps", "restore_ema_params", "make_sample_fn", "generate_samples",
           "compute_fid_kid", "compute_bpd", "fid_reference_split", "eval_config_problems",
           "IS_NOT_AVAILABLE", "DEFAULT_FID_NUM_REFERENCE", "FID_NETWORK"]

IS_NOT_AVAILABLE = ("not computed: the bundled FID Inception weights stop at pool3 (the network "
                    "itself has a 1008-way logits layer); set config.eval.inception_weights to "
                    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which includes it")
IS_NUM_SPLITS = 10                   # Salimans et al. (2016); the paper's 9.46 ± 0.11
FID_NETWORK = "fid_inception_2015_12_05"
DEFAULT_FID_NUM_REFERENCE = 50_000   # reference images when the split is larger (CIFAR10: 50k)
KID_NUM_SUBSETS = 100                # Binkowski et al. / stylegan2-ada defaults
KID_SUBSET_SIZE = 1000
FEATURE_BATCH_SIZE = 100             # images per Inception call (one compiled shape)
GRID_SIZE = 64                       # samples in the evaluate-mode grid PNG
_SAMPLE_KEY_SALT = 0x5A3E            # same noise for every checkpoint: comparable grids
_BPD_KEY_SALT = 0xB9D


# ----------------------------------------------------------------------------- config
def eval_config_problems(config, *, num_devices: int = 1, process_count: int = 1) -> List[str]:
    """Problems with ``config.eval`` as one-line messages naming the field (empty when valid)."""
    e, p = config.eval, []
    T = config.diffusion.num_timesteps

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    n = e.num_samples
    if not is_int(n) or n < 0 or n == 1:
        p.append(f"config.eval.num_samples={n!r} is out of range; allowed: 0 (skip FID/KID) or an "
                 "integer >= 2")
    elif n % process_count:
        p.append(f"config.eval.num_samples={n} must be divisible by the number of processes "
                 f"{process_count}")
    b = e.batch_size
    if not is_int(b) or b < 1:
        p.append(f"config.eval.batch_size={b!r} is out of range; allowed: an integer >= 1")
    elif b % num_devices:
        p.append(f"config.eval.batch_size={b} (the global batch) must be divisible by the number "
                 f"of devices {num_devices}; use a multiple of {num_devices}")
    k = e.sample_steps
    if not is_int(k) or k < 0 or (is_int(T) and k > T):
        p.append(f"config.eval.sample_steps={k!r} is out of range; allowed: 0 (the full T-step "
                 f"chain) or 1..{T} (respaced)")
    elif k > 0 and config.diffusion.var_type == "learned":
        p.append(f"config.eval.sample_steps={k}: a respaced chain cannot use "
                 "config.diffusion.var_type='learned' (its log-variance is the one-step kernel's); "
                 "use config.eval.sample_steps=0")
    m = e.bpd_num_examples
    if not is_int(m) or m < 0:
        p.append(f"config.eval.bpd_num_examples={m!r} is out of range; allowed: 0 (skip bits/dim) "
                 "or a positive integer")
    if e.checkpoints not in ("latest", "all"):
        p.append(f"config.eval.checkpoints={e.checkpoints!r} is not allowed; choose one of "
                 "['all', 'latest']")
    w = e.get("inception_weights")
    if w is not None and (not isinstance(w, str) or not io.isfile(io.absolute(w))):
        p.append(f"config.eval.inception_weights={w!r} is not a file; give the path of "
                 "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (downloaded by hand) or "
                 "leave it unset (no Inception Score)")
    floor = e.get("real_floor_split", "auto")
    if not isinstance(floor, str):
        p.append(f"config.eval.real_floor_split={floor!r} must be 'auto', '' (skip) or a TFDS "
                 "split string such as 'test[:512]'")
    for f in ("fid_split", "bpd_split"):
        v = e[f]
        if not isinstance(v, str) or not v:
            p.append(f"config.eval.{f}={v!r} must be a TFDS split string, e.g. 'train' or "
                     "'test[:1000]'")
    if not isinstance(e.clip_denoised, bool):
        p.append(f"config.eval.clip_denoised={e.clip_denoised!r} must be True or False")
    return p


def _validate(config, mesh) -> None:
    nd, pc = int(mesh.devices.size), jax.process_count()
    validate_config(config, num_devices=nd, process_count=pc)
    problems = eval_config_problems(config, num_devices=nd, process_count=pc)
    if problems:
        raise ConfigError("Invalid config (%d problem%s):\n  - %s" % (
            len(problems), "" if len(problems) == 1 else "s", "\n  - ".join(problems)))


def _chain_tag(config) -> str:
    k = config.eval.sample_steps
    return f"full{config.diffusion.num_timesteps}" if k == 0 else f"respaced{k}"


# ----------------------------------------------------------------------------- checkpoints
def _no_checkpoint_error(workdir: str, ckpt_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"No checkpoint in {ckpt_dir} (workdir {workdir!r}): train first, e.g. `python launch.py "
        f"--config <config> --workdir {workdir} --mode train` (or --mode train_and_evaluate), or "
        "point --workdir at a trained run.")


def checkpoint_steps(workdir: str, which: str = "latest") -> List[int]:
    """Steps to evaluate in ``<workdir>/checkpoints``: ``'latest'`` → ``[newest]``; ``'all'`` →
    every complete step on disk, ascending. Raises FileNotFoundError when there is none."""
    ckpt_dir = io.join(workdir, "checkpoints")
    if not io.isdir(ckpt_dir):
        raise _no_checkpoint_error(workdir, ckpt_dir)
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.all_steps()
    finally:
        ckpt.close()
    if not steps:
        raise _no_checkpoint_error(workdir, ckpt_dir)
    if which not in ("latest", "all"):
        raise ValueError(f"which={which!r}: use 'latest' or 'all'")
    return steps if which == "all" else steps[-1:]


def _abstract_state(config, model, mesh):
    from diffusion import train
    tx = train.make_optimizer(config)
    abstract = jax.eval_shape(lambda: train.init_state(config, model, tx))
    return abstract_like(abstract, parallel.replicated_sharding(mesh))


def restore_ema_params(ckpt: Checkpointer, step: int, config, model, mesh) -> Any:
    """The EMA parameters of the checkpoint at ``step``, replicated on ``mesh``.

    Raises ConfigError when the checkpoint was trained with a different model/process
    (`config_check.SHAPE_FIELDS`)."""
    diffs = incompatible_fields(ckpt.restore_config(step), config)
    if diffs:
        raise ConfigError(f"The checkpoint at step {step} in {ckpt.directory} was trained with a "
                          "different model/process than this config:\n  - " + "\n  - ".join(diffs)
                          + "\nEvaluate with the config the run was trained with.")
    state, _ = ckpt.restore(step, _abstract_state(config, model, mesh))
    return state.ema_params


# ----------------------------------------------------------------------------- sampling
def make_sample_fn(config, model, params) -> Callable:
    """``sample_fn(key, n) -> [n, H, W, C]`` in [−1, 1]: the full T-step ancestral chain
    (``config.eval.sample_steps = 0``) or the respaced K-step one, from ``params``."""
    from diffusion import train
    d, e = config.diffusion, config.eval
    schedule = train.schedule_from_config(config)
    s, c = config.data.image_size, config.data.channels
    denoise_fn = train.make_denoise_fn(model, params)

    def sample_fn(key, n):
        shape = (n, s, s, c)
        if e.sample_steps == 0:
            return sampling.ancestral_sample(schedule, denoise_fn, shape, key,
                                             mean_type=d.mean_type, var_type=d.var_type,
                                             clip_denoised=e.clip_denoised)
        return sampling.respaced_sample(schedule, denoise_fn, shape, key, num_steps=e.sample_steps,
                                        mean_type=d.mean_type, var_type=d.var_type,
                                        clip_denoised=e.clip_denoised)

    return sample_fn


def _batch_for(n_global: int, batch_size: int, num_devices: int) -> int:
    """The global batch: ``batch_size``, or less when n is smaller (a multiple of the devices)."""
    return min(batch_size, max(1, math.ceil(n_global / num_devices)) * num_devices)


def generate_samples(config, model, params, num_samples: int, *, mesh) -> np.ndarray:
    """This process's share of ``num_samples`` uint8 samples ``[N_local, H, W, C]`` drawn with the
    configured chain in global batches of ``config.eval.batch_size`` on ``mesh``. The key is the
    same for every checkpoint (``fold_in(key(seed), salt)``)."""
    key = jax.random.fold_in(jax.random.key(config.seed), _SAMPLE_KEY_SALT)
    batch = _batch_for(num_samples, config.eval.batch_size, int(mesh.devices.size))
    return sampling.sample_in_batches(make_sample_fn(config, model, params), num_samples,
                                      batch // jax.process_count(), key, mesh=mesh,
                                      as_uint8=True)


# ----------------------------------------------------------------------------- FID / KID
def _to_rgb(images: np.ndarray) -> np.ndarray:
    """Grayscale ``[..., 1]`` → 3 channels (repeated) for Inception; RGB unchanged."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _with_progress(feature_fn: Callable, total: int, what: str, every_s: float = 30.0) -> Callable:
    """Wraps ``feature_fn`` to log "<what>: Inception features k/total" about every 30 s."""
    st = {"done": 0, "t0": time.time(), "last": time.time()}

    def fn(batch):
        out = np.asarray(feature_fn(batch))
        st["done"] = min(st["done"] + len(batch), total)
        now = time.time()
        if now - st["last"] >= every_s or st["done"] >= total:
            st["last"] = now
            logging.info("%s: Inception features %d/%d images (%.1f img/s)", what, st["done"],
                         total, st["done"] / max(now - st["t0"], 1e-9))
        return out

    return fn


def fid_reference_split(config) -> str:
    """The TFDS split of the FID reference images: ``config.eval.fid_split``, or its first
    `DEFAULT_FID_NUM_REFERENCE` images when the whole split is larger (a split given with a slice
    or a '+' is used as it is)."""
    from diffusion.data import get_builder
    split = config.eval.fid_split
    if "[" in split or "+" in split:
        return split
    n = get_builder(config.data.dataset, config.data.data_dir).info.splits[split].num_examples
    return f"{split}[:{DEFAULT_FID_NUM_REFERENCE}]" if n > DEFAULT_FID_NUM_REFERENCE else split


def real_floor_split(config) -> Optional[str]:
    """The split whose real images give the FID "floor" printed beside the model's FID: real
    images scored exactly like the samples (same N, resolution, network and reference).
    ``config.eval.real_floor_split``: ``'auto'`` (the first ``num_samples`` images of the split
    that is not the reference split: ``test`` when FID is against ``train``, else ``train``), a
    TFDS split string, or ``''`` to skip."""
    s = config.eval.get("real_floor_split", "auto")
    if not s or config.eval.num_samples <= 0:
        return None
    if s != "auto":
        return s
    other = "test" if config.eval.fid_split.split("[")[0].strip() == "train" else "train"
    return f"{other}[:{config.eval.num_samples}]"


def _reference_cache_dir(config, workdir: str, network: str) -> str:
    from diffusion.data import default_data_dir
    sub = ["fid_stats", network] + ([f"p{jax.process_index()}"] if jax.process_index() else [])
    base = io.absolute(config.data.data_dir) if config.data.data_dir else default_data_dir()
    for root in (base, io.join(workdir, "eval")):
        path = io.join(root, *sub)
        try:
            return io.probe_writable(path, what="FID reference cache")
        except OSError:
            continue
    raise OSError(f"Neither {base} nor {workdir}/eval is writable for the FID reference cache")


def _load_reference(config, workdir, feature_fn, network, split) -> fid_lib.ReferenceStatistics:
    from diffusion.data import load_split
    d = config.data
    t0 = time.time()
    images = load_split(d.dataset, split, data_dir=d.data_dir, image_size=d.image_size)
    if len(images) < 2:
        raise ValueError(f"config.eval.fid_split={config.eval.fid_split!r} of {d.dataset!r} has "
                         f"{len(images)} image(s); FID needs at least 2")
    cache_dir = _reference_cache_dir(config, workdir, network)
    logging.info("FID reference: %d images of %s/%s at %dpx (cache %s)", len(images), d.dataset,
                 split, d.image_size, cache_dir)
    images = _to_rgb(images)
    ref = fid_lib.reference_statistics(
        f"{d.dataset}_{d.image_size}px", split,
        _with_progress(feature_fn, len(images), f"reference {d.dataset}/{split}"),
        images=images, cache_dir=cache_dir, batch_size=FEATURE_BATCH_SIZE, network=network)
    logging.info("FID reference statistics ready: N_ref=%d (%.1fs)", len(ref.features),
                 time.time() - t0)
    return ref


def compute_fid_kid(gen_features: np.ndarray, ref: fid_lib.ReferenceStatistics) -> Dict[str, Any]:
    """FID and KID of generated features ``[N, d]`` against a reference.

    Returns ``{'fid', 'kid', 'kid_se', 'num_gen', 'num_ref', 'kid_subset_size',
    'kid_num_subsets'}`` (Python floats/ints). FID uses the exact N×N_ref route when
    ``max(N, N_ref) <= d``, else the d×d statistics (sqrtm)."""
    g = np.asarray(gen_features, np.float64)
    n, n_ref, dim = len(g), len(ref.features), g.shape[1]
    if max(n, n_ref) <= dim:
        fid = fid_lib.frechet_distance_from_features(g, ref.features)
    else:
        fid = fid_lib.frechet_distance(*fid_lib.compute_statistics(g), ref.mu, ref.sigma)
    kid, kid_se = fid_lib.kernel_inception_distance(g, ref.features, num_subsets=KID_NUM_SUBSETS,
                                                    subset_size=KID_SUBSET_SIZE)
    return {"fid": float(fid), "kid": float(kid), "kid_se": float(kid_se), "num_gen": int(n),
            "num_ref": int(n_ref), "kid_subset_size": int(min(n, n_ref, KID_SUBSET_SIZE)),
            "kid_num_subsets": KID_NUM_SUBSETS}


# ----------------------------------------------------------------------------- bits/dim
def _global_array(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a host array every process holds in full."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def compute_bpd(config, model, params, images: np.ndarray, *, mesh) -> Dict[str, Any]:
    """bits/dim of the full variational bound on uint8 ``images [M, H, W, C]`` (every process holds
    all M), in global batches of ``config.eval.batch_size`` sharded over ``mesh``.

    Returns means over the M examples: ``total`` (± ``total_se``), ``prior``, ``rate`` (prior +
    Σ_{t>0} terms) and ``distortion`` (the decoder term, t = 0) — paper Table 4 — and the lists
    ``terms_bpd[t]`` (column t of `likelihood.bits_per_dim`: L_{t−1} in the paper's numbering,
    [0] the decoder NLL), ``mse[t]`` (mean squared error of x̂_0 from x_t, [−1, 1] scale) and
    ``mse_clipped[t]`` (the same with x̂_0 clipped to [−1, 1]).

    x̂_0 is clipped to [−1, 1] inside pθ when ``config.eval.clip_denoised`` (the default, as the
    released ``calc_bpd_loop`` and its CIFAR10 evaluation); ``clip_denoised`` in the result says
    which bound this is."""
    from diffusion import train
    from diffusion.data import normalize_images
    d = config.diffusion
    clip = bool(config.eval.clip_denoised)
    schedule = train.schedule_from_config(config)
    rep, data = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    M = len(images)
    batch = _batch_for(M, config.eval.batch_size, int(mesh.devices.size))

    def fn(params, x, mask, index):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), _BPD_KEY_SALT),
                                 index)
        out = likelihood.bits_per_dim(schedule, train.make_denoise_fn(model, params), x, key,
                                      mean_type=d.mean_type, var_type=d.var_type,
                                      clip_denoised=clip)
        m = mask.astype(jnp.float32)
        return {"total": jnp.sum(m * out["total_bpd"]),
                "total_sq": jnp.sum(m * jnp.square(out["total_bpd"])),
                "prior": jnp.sum(m * out["prior_bpd"]),
                "terms": m @ out["terms_bpd"], "mse": m @ out["mse"],
                "mse_clipped": m @ out["mse_clipped"]}

    step = jax.jit(fn, in_shardings=(rep, data, data, rep), out_shardings=rep)
    sums, t0 = None, time.time()
    n_batches = math.ceil(M / batch)
    for i in range(n_batches):
        chunk = images[i * batch:(i + 1) * batch]
        k = len(chunk)
        if k < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - k, axis=0)])
        mask = (np.arange(batch) < k).astype(np.float32)
        out = jax.device_get(step(params, _global_array(normalize_images(chunk), data),
                                  _global_array(mask, data),
                                  _global_array(np.asarray(i, np.int32), rep)))
        out = {key: np.asarray(v, np.float64) for key, v in out.items()}
        sums = out if sums is None else {key: sums[key] + out[key] for key in sums}
        logging.info("bits/dim: batch %d/%d, %d/%d examples, %.1fs", i + 1, n_batches,
                     min((i + 1) * batch, M), M, time.time() - t0)
    mean = {key: v / M for key, v in sums.items()}
    var = max(mean["total_sq"] - mean["total"] ** 2, 0.0) * M / max(M - 1, 1)
    terms = mean["terms"]
    return {"total": float(mean["total"]), "total_se": float(math.sqrt(var / M)),
            "prior": float(mean["prior"]), "rate": float(mean["prior"] + terms[1:].sum()),
            "distortion": float(terms[0]), "terms_bpd": [float(v) for v in terms],
            "mse": [float(v) for v in mean["mse"]],
            "mse_clipped": [float(v) for v in mean["mse_clipped"]], "num_examples": int(M),
            "clip_denoised": clip}


# ----------------------------------------------------------------------------- files
def _write_json_atomic(path: str, obj: Any) -> None:
    io.write_json(path, obj, indent=1, sort_keys=True)


def _read_results(path: str) -> Dict[str, Any]:
    return io.read_json(path, default={})


def _save_npz_atomic(path: str, **arrays) -> None:
    io.write_npz(path, **arrays)


def _load_npz(path: str, key: str, shape, dtype) -> Optional[np.ndarray]:
    """``path[key]`` if it exists and has ``shape``/``dtype``; None otherwise (recompute)."""
    if not io.isfile(path):
        return None
    try:
        a = io.read_npz(path, keys=[key])[key]
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file means: recompute
        logging.warning("Ignoring unreadable %s (%s)", path, e)
        return None
    if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
        logging.warning("Ignoring %s: %s %s, expected %s %s", path, a.shape, a.dtype, shape, dtype)
        return None
    return a


def _load_features(path: str, network: str, n: int, seed: int,
                   need_logits: bool = False) -> Optional[Tuple[np.ndarray, Optional[np.ndarray]]]:
    """Cached ``(features, logits or None)`` of this process's samples if they match (network,
    N, seed, and logits present when ``need_logits``), else None."""
    if not io.isfile(path):
        return None
    try:
        z = io.read_npz(path)
        if str(z["network"]) == network and len(z["features"]) == n and int(z["seed"]) == seed:
            logits = z.get("logits")
            if need_logits and logits is None:
                return None
            return z["features"], logits
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file means: recompute
        logging.warning("Ignoring unreadable %s (%s)", path, e)
    return None


def _all_processes(flag: bool) -> bool:
    """True when ``flag`` holds on every process (all take the same collective path)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _from_process_0(flags: List[bool]) -> List[bool]:
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils
    got = multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32))
    return [bool(v) for v in np.asarray(got)]


def _keep_previous(entry: dict, keys) -> None:
    """Moves metrics computed with other settings (e.g. another N) to ``entry['previous']``
    instead of losing them (``keys[0]`` is the metric; the others are its companions)."""
    old = {k: entry.pop(k) for k in keys if k in entry}
    if keys[0] in old:
        entry.setdefault("previous", []).append(old)


def _settings_match(entry: Optional[dict], settings: dict) -> bool:
    return bool(entry) and entry.get("settings") == settings


# ----------------------------------------------------------------------------- the modes
class _Evaluator:
    """Per-run state shared by the checkpoint steps (mesh, model, reference statistics)."""

    def __init__(self, config, workdir, mesh, feature_fn, network):
        from diffusion import train
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.model = train.create_model(config)
        self.eval_dir = io.join(workdir, "eval")
        self.main = parallel.is_main_process()
        self._feature_fn, self.network = feature_fn, network
        self._feature_logits_fn = None
        self._ref = None
        self.ref_split = None
        self.results_path = io.join(self.eval_dir, "results.json")
        self.results = _read_results(self.results_path) if self.main else {}
        self.writer = None   # clu metric writer, set by `run`

    # -- lazily built pieces
    def feature_fn(self) -> Callable:
        if self._feature_fn is None:
            from diffusion.metrics import load_inception_params, make_feature_fn
            t0 = time.time()
            self._feature_fn = make_feature_fn(load_inception_params())
            logging.info("Loaded the FID Inception network (%.1fs)", time.time() - t0)
        return self._feature_fn

    def feature_logits_fn(self) -> Callable:
        """``images -> (pool3, logits)`` of the network read from ``config.eval.inception_weights``
        (its pool3 equals the bundled network's; the logits give the Inception Score)."""
        if self._feature_logits_fn is None:
            from diffusion.metrics.inception import (load_inception_logits_params,
                                                     make_feature_logits_fn)
            t0 = time.time()
            self._feature_logits_fn = make_feature_logits_fn(
                load_inception_logits_params(self.config.eval.inception_weights))
            logging.info("Loaded the Inception network with logits from %s (%.1fs)",
                         self.config.eval.inception_weights, time.time() - t0)
        return self._feature_logits_fn

    def reference(self) -> fid_lib.ReferenceStatistics:
        if self._ref is None:
            self.ref_split = fid_reference_split(self.config)
            self._ref = _load_reference(self.config, self.workdir, self.feature_fn(), self.network,
                                        self.ref_split)
        return self._ref

    def save_results(self) -> None:
        if self.main:
            _write_json_atomic(self.results_path, self.results)

    # -- settings that make a stored metric reusable
    def fid_settings(self) -> dict:
        c = self.config
        return {"num_gen": c.eval.num_samples, "chain": _chain_tag(c),
                "clip_denoised": c.eval.clip_denoised, "seed": c.seed,
                "dataset": c.data.dataset, "image_size": c.data.image_size,
                "fid_split": c.eval.fid_split, "network": self.network}

    def bpd_settings(self) -> dict:
        c = self.config
        return {"bpd_split": c.eval.bpd_split, "bpd_num_examples": c.eval.bpd_num_examples,
                "seed": c.seed, "dataset": c.data.dataset, "image_size": c.data.image_size,
                "clip_denoised": c.eval.clip_denoised}

    def _file(self, kind: str, step: int, ext: str, per_process: bool = False) -> str:
        c = self.config
        name = f"{kind}_step_{step:08d}_n{c.eval.num_samples}_{_chain_tag(c)}"
        if not c.eval.clip_denoised:
            name += "_noclip"
        if per_process and jax.process_count() > 1:
            name += f"_p{jax.process_index()}"
        return io.join(self.eval_dir, name + ext)

    # -- one step
    def evaluate_step(self, step: int, params_fn: Callable[[], Any]) -> Dict[str, Any]:
        c = self.config
        entry = self.results.get(str(step), {})
        need_fid = c.eval.num_samples > 0 and not _settings_match(entry.get("fid"),
                                                                   self.fid_settings())
        need_bpd = c.eval.bpd_num_examples > 0 and not _settings_match(entry.get("bpd"),
                                                                        self.bpd_settings())
        need_fid, need_bpd = _from_process_0([need_fid, need_bpd])
        if not (need_fid or need_bpd):
            logging.info("Step %d: already evaluated in %s; skipping.", step, self.results_path)
            return entry
        params = params_fn()
        entry["step"] = step
        scalars = {}
        if need_fid:
            scalars.update(self._fid_kid(step, params, entry))
        if need_bpd:
            scalars.update(self._bpd(step, params, entry))
        if self.main:
            self.writer.write_scalars(step, scalars)
            self.writer.flush()
        return entry

    def _samples(self, step: int, params) -> np.ndarray:
        c = self.config
        n = c.eval.num_samples
        n_local = n // jax.process_count()
        s, ch = c.data.image_size, c.data.channels
        path = self._file("samples", step, ".npz", per_process=True)
        images = _load_npz(path, "images", (n_local, s, s, ch), np.uint8)
        if _all_processes(images is not None):
            logging.info("Step %d: reusing %d samples from %s", step, n, path)
            return images
        logging.info("Step %d: drawing N=%d samples with the %s chain (global batch %d)", step, n,
                     "full T=%d-step ancestral" % c.diffusion.num_timesteps
                     if c.eval.sample_steps == 0 else "respaced K=%d-step" % c.eval.sample_steps,
                     _batch_for(n, c.eval.batch_size, int(self.mesh.devices.size)))
        t0 = time.time()
        images = generate_samples(c, self.model, params, n, mesh=self.mesh)
        logging.info("Step %d: %d samples in %.1fs", step, n, time.time() - t0)
        _save_npz_atomic(path, images=images, step=np.asarray(step), seed=np.asarray(c.seed),
                         chain=np.asarray(_chain_tag(c)))
        if self.main:
            io.save_image_grid(images[:GRID_SIZE], self._file("samples", step, ".png"))
            self.writer.write_images(step, {f"eval_samples_{_chain_tag(c)}": images[:16]})
        return images

    def _fid_kid(self, step: int, params, entry: dict) -> Dict[str, float]:
        c = self.config
        n = c.eval.num_samples
        feat_path = self._file("features", step, ".npz", per_process=True)
        want_is = bool(c.eval.get("inception_weights"))
        cached = _load_features(feat_path, self.network, n // jax.process_count(), c.seed,
                                need_logits=want_is)
        feats, logits = cached if cached is not None else (None, None)
        if not _all_processes(feats is not None):
            images = self._samples(step, params)
            entry["samples"] = {"num_samples": n, "chain": _chain_tag(c),
                                "sample_steps": c.eval.sample_steps,
                                "clip_denoised": c.eval.clip_denoised,
                                "file": os.path.basename(self._file("samples", step, ".npz",
                                                                    per_process=True))}
            self.save_results()
            t0 = time.time()
            extra = {}
            if want_is:   # pool3 and logits in one pass of the logits-capable network
                fn = _with_progress(self.feature_logits_fn(), len(images), f"step {step} samples")
                feats, logits = fid_lib.extract_features_and_logits(
                    _to_rgb(images), fn, batch_size=FEATURE_BATCH_SIZE)
                extra["logits"] = logits
            else:
                fn = _with_progress(self.feature_fn(), len(images), f"step {step} samples")
                feats = fid_lib.extract_features(_to_rgb(images), fn, batch_size=FEATURE_BATCH_SIZE)
            logging.info("Step %d: Inception features of %d samples in %.1fs", step, len(feats),
                         time.time() - t0)
            _save_npz_atomic(feat_path, features=feats, network=np.asarray(self.network),
                             seed=np.asarray(c.seed), **extra)
        if want_is and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            logits = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            feats = np.asarray(multihost_utils.process_allgather(feats, tiled=True))
        ref = self.reference()
        res = compute_fid_kid(feats, ref)
        res["ref_split"] = self.ref_split
        res["settings"] = self.fid_settings()
        n_gen, n_ref = res["num_gen"], res["num_ref"]
        _keep_previous(entry, ("fid", "kid"))
        entry["fid"] = {"value": res["fid"], "num_gen": n_gen, "num_ref": n_ref,
                        "ref_split": res["ref_split"], "settings": res["settings"]}
        entry["kid"] = {"mean": res["kid"], "se": res["kid_se"], "num_gen": n_gen,
                        "num_ref": n_ref, "subset_size": res["kid_subset_size"],
                        "num_subsets": res["kid_num_subsets"]}
        if want_is:
            is_mean, is_std = fid_lib.inception_score_from_logits(logits, num_splits=IS_NUM_SPLITS)
            entry["inception_score"] = {"mean": is_mean, "std": is_std, "num": len(logits),
                                        "num_splits": IS_NUM_SPLITS,
                                        "weights": os.path.basename(c.eval.inception_weights)}
            is_text = "%.3f ± %.3f (%d splits)" % (is_mean, is_std, IS_NUM_SPLITS)
        else:
            entry["inception_score"] = is_text = IS_NOT_AVAILABLE
        floor = self.real_floor()
        if floor is not None:
            entry["fid"]["real_floor"] = {k: floor[k] for k in ("fid", "kid", "num")} | {
                "split": floor["settings"]["split"]}
        self.save_results()
        logging.info("Step %d: FID@%d = %.3f (N_gen=%d, N_ref=%d, %s/%s, %s chain)%s; "
                     "KID@%d = %.5f ± %.5f; IS %s", step, n_gen, res["fid"], n_gen, n_ref,
                     c.data.dataset, res["ref_split"], _chain_tag(c),
                     "" if floor is None else "; real-data floor at N=%d: FID %.3f, KID %.5f (%s)"
                     % (floor["num"], floor["fid"], floor["kid"], floor["settings"]["split"]),
                     n_gen, res["kid"], res["kid_se"], is_text)
        if n_gen < 10_000:
            logging.info("FID is strongly biased at N=%d: compare FIDs only at equal N (the "
                         "paper reports N=50000).", n_gen)
        out = {f"fid_N{n_gen}": res["fid"], f"kid_N{n_gen}": res["kid"],
               f"kid_se_N{n_gen}": res["kid_se"]}
        if want_is:
            out[f"inception_score_N{n_gen}"] = entry["inception_score"]["mean"]
        if floor is not None:
            out[f"fid_real_floor_N{floor['num']}"] = floor["fid"]
        return out

    def real_floor(self) -> Optional[Dict[str, Any]]:
        """FID/KID of real images of `real_floor_split` against the same reference, at the same N
        as the samples (fewer if the split is smaller: then said), computed once and kept in
        ``eval/real_floor.json`` with its settings; None when disabled or unavailable."""
        from diffusion.data import load_split
        c = self.config
        split = real_floor_split(c)
        if split is None:
            return None
        ref = self.reference()
        settings = {"split": split, "ref_split": self.ref_split, "network": self.network,
                    "dataset": c.data.dataset, "image_size": c.data.image_size}
        path = io.join(self.eval_dir, "real_floor.json")
        stored = _read_results(path)
        if _all_processes(bool(stored) and stored.get("settings") == settings):
            return stored
        try:
            images = load_split(c.data.dataset, split, data_dir=c.data.data_dir,
                                image_size=c.data.image_size)
        except (ValueError, KeyError) as e:
            logging.warning("No real-data FID floor: split %r of %s is not available (%s); set "
                            "config.eval.real_floor_split to another split or '' to skip.",
                            split, c.data.dataset, e)
            return None
        if len(images) < c.eval.num_samples:
            logging.warning("Real-data floor: %s has %d images, fewer than the %d samples: the "
                            "floor is at N=%d (biased upwards relative to the model's FID).",
                            split, len(images), c.eval.num_samples, len(images))
        t0 = time.time()
        fn = _with_progress(self.feature_fn(), len(images), f"real-data floor {split}")
        feats = fid_lib.extract_features(_to_rgb(images), fn, batch_size=FEATURE_BATCH_SIZE)
        res = compute_fid_kid(feats, ref)
        floor = {"fid": res["fid"], "kid": res["kid"], "kid_se": res["kid_se"],
                 "num": res["num_gen"], "num_ref": res["num_ref"], "settings": settings}
        logging.info("Real-data floor: FID@%d = %.3f, KID = %.5f for real %s/%s images against "
                     "the same reference (%.1fs)", floor["num"], floor["fid"], floor["kid"],
                     c.data.dataset, split, time.time() - t0)
        if self.main:
            _write_json_atomic(path, floor)
        return floor

    def _bpd(self, step: int, params, entry: dict) -> Dict[str, float]:
        from diffusion.data import load_split
        c = self.config
        m, split = c.eval.bpd_num_examples, c.eval.bpd_split
        sliced = split if ("[" in split or "+" in split) else f"{split}[:{m}]"
        try:
            images = load_split(c.data.dataset, sliced, data_dir=c.data.data_dir,
                                image_size=c.data.image_size)
        except ValueError:   # the split has fewer than m examples: take all of it
            images = load_split(c.data.dataset, split, data_dir=c.data.data_dir,
                                image_size=c.data.image_size)
        images = images[:m]
        if len(images) < m:
            logging.warning("config.eval.bpd_split=%r has only %d examples (asked for %d)", split,
                            len(images), m)
        logging.info("Step %d: bits/dim of the full bound (T=%d network calls each) on %d "
                     "examples of %s/%s", step, c.diffusion.num_timesteps, len(images),
                     c.data.dataset, split)
        t0 = time.time()
        res = compute_bpd(c, self.model, params, images, mesh=self.mesh)
        res["split"] = split
        res["settings"] = self.bpd_settings()
        _keep_previous(entry, ("bpd",))
        entry["bpd"] = res
        self.save_results()
        logging.info("Step %d: bits/dim = %.4f ± %.4f (prior %.2e, rate %.4f, distortion %.4f; "
                     "N=%d of %s, x̂0 %s, %.1fs)", step, res["total"], res["total_se"],
                     res["prior"], res["rate"], res["distortion"], res["num_examples"], split,
                     "clipped" if res["clip_denoised"] else "not clipped", time.time() - t0)
        return {"bpd": res["total"], "bpd_prior": res["prior"], "bpd_rate": res["rate"],
                "bpd_distortion": res["distortion"]}

    def sample_step(self, step: int, params) -> str:
        c = self.config
        n = int(c.training.get("num_grid_samples", 64) or 64)
        n = math.ceil(n / jax.process_count()) * jax.process_count()
        logging.info("Step %d: drawing a grid of %d samples with the %s chain", step, n,
                     _chain_tag(c))
        images = generate_samples(c, self.model, params, n, mesh=self.mesh)
        png = io.join(self.eval_dir, f"samples_step_{step:08d}.png")
        if self.main:
            _save_npz_atomic(png[:-4] + ".npz", images=images, step=np.asarray(step),
                             seed=np.asarray(c.seed), chain=np.asarray(_chain_tag(c)))
            io.save_image_grid(images, png)
            self.writer.write_images(step, {f"samples_{_chain_tag(c)}": images[:16]})
            logging.info("Step %d: wrote %s", step, png)
        return png


def run(config, workdir: str, *, mode: str = "evaluate", feature_fn: Optional[Callable] = None,
        feature_network: Optional[str] = None) -> Dict[int, Any]:
    """Evaluates (``mode='evaluate'``) or samples from (``mode='sample'``) the checkpoints of
    ``workdir`` chosen by ``config.eval.checkpoints``; see the module docstring.

    Args:
      config: the run's config (the model/process fields must match the checkpoint's).
      workdir: the training workdir (``<workdir>/checkpoints``); outputs go to ``<workdir>/eval``.
      mode: ``'evaluate'`` or ``'sample'``.
      feature_fn: ``[B, H, W, 3] uint8 -> [B, D]`` to use instead of the FID Inception network
        (tests, other feature networks); ``feature_network`` then names it (default
        ``'custom'``) so its cached statistics and stored results never mix with Inception's.

    Returns:
      ``{step: results entry}`` (evaluate) or ``{step: PNG path}`` (sample).

    Raises:
      FileNotFoundError: no checkpoint in ``<workdir>/checkpoints`` (train first).
      ConfigError: invalid eval settings, or a config that does not match the checkpoint.
    """
    from clu import metric_writers
    if mode not in ("evaluate", "sample"):
        raise ValueError(f"mode={mode!r}: use 'evaluate' or 'sample'")
    mesh = parallel.make_mesh()
    _validate(config, mesh)
    steps = checkpoint_steps(workdir, config.eval.checkpoints)
    network = FID_NETWORK if feature_fn is None else (feature_network or "custom")
    ev = _Evaluator(config, workdir, mesh, feature_fn, network)
    io.makedirs(ev.eval_dir)   # every process: each saves its share of samples
    ev.writer = metric_writers.create_default_writer(
        ev.eval_dir, just_logging=not (ev.main and config.training.get("tensorboard", True)),
        asynchronous=False)
    ckpt = Checkpointer(io.join(workdir, "checkpoints"), async_save=False)
    logging.info("%s %d checkpoint(s) of %s: steps %s", "Evaluating" if mode == "evaluate"
                 else "Sampling from", len(steps), workdir, steps)
    out: Dict[int, Any] = {}
    try:
        for i, step in enumerate(steps):
            logging.info("=== step %d (%d/%d) ===", step, i + 1, len(steps))
            params_fn = lambda s=step: restore_ema_params(ckpt, s, config, ev.model, mesh)  # noqa
            if mode == "sample":
                out[step] = ev.sample_step(step, params_fn())
            else:
                out[step] = ev.evaluate_step(step, params_fn)
                ev.results[str(step)] = out[step]
                ev.save_results()
        if mode == "evaluate":
            _log_summary(out)
    finally:
        ckpt.close()
        ev.writer.flush()
        ev.writer.close()
    return out


def _log_summary(results: Dict[int, Any]) -> None:
    for step, e in sorted(results.items()):
        parts = [f"step {step}:"]
        if "fid" in e:
            f, k = e["fid"], e["kid"]
            parts.append(f"FID@{f['num_gen']} = {f['value']:.3f} (N_gen={f['num_gen']}, "
                         f"N_ref={f['num_ref']}), KID = {k['mean']:.5f} ± {k['se']:.5f}")
        if "bpd" in e:
            parts.append(f"bits/dim = {e['bpd']['total']:.4f} (N={e['bpd']['num_examples']})")
        parts = parts[:1] + ["; ".join(parts[1:])]
        logging.info(" ".join(parts))
