"""The metrics of an evaluation behind one interface, and the context they share.

`EvalContext` holds the run-level set-up (config, mesh, model, sampler, results store, output
directory, writer, timings) and the feature networks and references, and composes the per-step
samples and features (`step_data.StepSamples`, ``ctx.step_samples``) and the real-data floor
(`floor.RealFloor`, ``ctx.floor``). `compute_fid_kid` lives in `references` (re-exported here).

An `Evaluator` has a ``key`` (its entry in ``results.json``), ``settings(ctx)`` (what makes a
stored value reusable) and ``evaluate(ctx, step, params, entry) -> scalars`` (computes, stores in
``entry``, returns TensorBoard scalars). `evaluators_from_config` builds the list ``config.eval``
asks for:

- `FidKidEvaluator` per split of ``eval.fid_split`` (``'train'``, or ``'train,test'`` for both
  columns of the paper's Table 1): FID and KID (± s.e.) of the samples' Inception features against
  that split's statistics; the primary (first) split also gets the Inception Score (when
  ``eval.inception_weights`` has the logits layer) and the real-data floor. All FID evaluators of
  a step share one set of samples and features.
- `BpdEvaluator` per split of ``eval.bpd_split``: bits/dim of the variational bound (paper Eq. 5),
  the full T-step bound (``eval.bpd_timesteps = 0``) or its unbiased estimate from K random
  timesteps per example with its standard error.

The primary split's results keep their plain keys (``fid``, ``kid``, ``inception_score``,
``bpd``); a further split ``s`` is stored under ``fid@s`` (with its ``kid`` inside) or ``bpd@s``.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import factories, io, likelihood, parallel, rng, samplers
from diffusion.evaluation import generator
from diffusion.evaluation import settings as S
from diffusion.evaluation.floor import RealFloor
from diffusion.evaluation.references import FidReferences, compute_fid_kid
from diffusion.evaluation.results import ResultsStore, settings_match
from diffusion.evaluation.step_data import StepSamples
from diffusion.metrics import fid as fid_lib
from diffusion.progress import Progress

__all__ = [
    "EvalContext",
    "Evaluator",
    "FidKidEvaluator",
    "BpdEvaluator",
    "evaluators_from_config",
    "compute_fid_kid",
    "compute_bpd",
]


def _global_array(x: np.ndarray, sharding) -> jax.Array:
    """A global array from a host array every process holds in full."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def compute_bpd(
    config, model, params, images: np.ndarray, *, mesh, what: str = "bits/dim"
) -> Dict[str, Any]:
    """bits/dim of the variational bound (paper Eq. 5) on uint8 ``images [M, H, W, C]`` (every
    process holds all M), in global batches of ``config.eval.batch_size`` sharded over ``mesh``.

    ``config.eval.bpd_timesteps = 0``: the full bound (`likelihood.bits_per_dim`, T network calls
    per example). Returns means over the M examples: ``total`` (± ``total_se``), ``prior``,
    ``rate`` (prior + Σ_{t>0} terms) and ``distortion`` (the decoder term, t = 0) — paper
    Table 4 — and the lists ``terms_bpd[t]`` (column t of `likelihood.bits_per_dim`: L_{t−1} in
    the paper's numbering, [0] the decoder NLL), ``mse[t]`` (mean squared error of x̂_0 from x_t,
    [−1, 1] scale) and ``mse_clipped[t]`` (the same with x̂_0 clipped to [−1, 1]).

    ``bpd_timesteps = K > 0``: the unbiased estimate of `likelihood.bound_estimate` (prior and
    decoder terms exact, the T−1 others from K random timesteps per example, K + 1 calls):
    ``total`` ± ``total_se`` — the standard error of the mean over examples, which includes the
    estimator's own noise — ``prior``, ``distortion`` and ``rate``; no per-t lists.

    x̂_0 is clipped to [−1, 1] inside pθ when ``config.eval.clip_denoised`` (the default, as the
    released ``calc_bpd_loop`` and its CIFAR10 evaluation); ``clip_denoised`` in the result says
    which bound this is."""
    param = factories.parameterization(config)
    clip = bool(config.eval.clip_denoised)
    K = int(config.eval.get("bpd_timesteps", 0) or 0)
    rep, data = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    batch = generator.batch_for(len(images), config.eval.batch_size, int(mesh.devices.size))
    fn = _masked_bound_sums(config, model, param, clip, K)
    step = jax.jit(fn, in_shardings=(rep, data, data, rep), out_shardings=rep)
    sums = _sum_over_batches(step, params, images, batch, rep, data, what)
    return _bpd_summary(sums, len(images), clip, K)


def _masked_bound_sums(config, model, param, clip: bool, K: int) -> Callable:
    """``(params, x [B, H, W, C] in [−1, 1], mask [B], batch index) -> sums over the unmasked
    examples`` of the bound's total (and its square), prior, and either the decoder term
    (``K > 0``: `likelihood.bound_estimate` from K timesteps) or the per-t terms and x̂_0 errors
    (the full bound, `likelihood.bits_per_dim`). The noise is `rng.BPD_NOISE` folded with the
    batch index."""
    schedule = factories.schedule_from_config(config)

    def fn(params, x, mask, index):
        key = jax.random.fold_in(rng.stream(config.seed, rng.BPD_NOISE), index)
        denoise_fn = factories.make_denoise_fn(model, params)
        m = mask.astype(jnp.float32)
        if K:
            out = likelihood.bound_estimate(
                schedule,
                denoise_fn,
                x,
                key,
                num_sampled_timesteps=K,
                **param.model_kwargs,
                clip_denoised=clip,
            )
            return {
                "total": jnp.sum(m * out["total_bpd"]),
                "total_sq": jnp.sum(m * jnp.square(out["total_bpd"])),
                "prior": jnp.sum(m * out["prior_bpd"]),
                "decoder": jnp.sum(m * out["decoder_bpd"]),
            }
        out = likelihood.bits_per_dim(
            schedule, denoise_fn, x, key, **param.model_kwargs, clip_denoised=clip
        )
        return {
            "total": jnp.sum(m * out["total_bpd"]),
            "total_sq": jnp.sum(m * jnp.square(out["total_bpd"])),
            "prior": jnp.sum(m * out["prior_bpd"]),
            "terms": m @ out["terms_bpd"],
            "mse": m @ out["mse"],
            "mse_clipped": m @ out["mse_clipped"],
        }

    return fn


def _sum_over_batches(step, params, images: np.ndarray, batch: int, rep, data, what: str):
    """Runs ``step`` on uint8 ``images [M, H, W, C]`` in global batches of ``batch`` (the last
    padded by repeating its final image, the padding masked out) and adds up its float64
    outputs; progress as ``what``."""
    from diffusion.data import normalize_images

    M = len(images)
    sums = None
    prog = Progress(what, M, unit="examples", every_s=0.0)
    for i in range(math.ceil(M / batch)):
        chunk = images[i * batch : (i + 1) * batch]
        k = len(chunk)
        if k < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - k, axis=0)])
        mask = (np.arange(batch) < k).astype(np.float32)
        out = jax.device_get(
            step(
                params,
                _global_array(normalize_images(chunk), data),
                _global_array(mask, data),
                _global_array(np.asarray(i, np.int32), rep),
            )
        )
        out = {key: np.asarray(v, np.float64) for key, v in out.items()}
        sums = out if sums is None else {key: sums[key] + out[key] for key in sums}
        prog.update(k)
    return sums


def _bpd_summary(sums: Dict[str, np.ndarray], M: int, clip: bool, K: int) -> Dict[str, Any]:
    """Means over the M examples from the sums: total ± its standard error (sample variance
    over examples), prior, rate = prior + Σ_{t>0} terms and distortion = the decoder term (paper
    Table 4), and for the full bound (``K = 0``) the per-t lists."""
    mean = {key: v / M for key, v in sums.items()}
    var = max(mean["total_sq"] - mean["total"] ** 2, 0.0) * M / max(M - 1, 1)
    res = {
        "total": float(mean["total"]),
        "total_se": float(math.sqrt(var / M)),
        "prior": float(mean["prior"]),
        "num_examples": int(M),
        "clip_denoised": clip,
    }
    if K:
        res.update(
            distortion=float(mean["decoder"]),
            rate=float(mean["total"] - mean["decoder"]),
            bpd_timesteps=K,
        )
        return res
    terms = mean["terms"]
    res.update(
        rate=float(mean["prior"] + terms[1:].sum()),
        distortion=float(terms[0]),
        terms_bpd=[float(v) for v in terms],
        mse=[float(v) for v in mean["mse"]],
        mse_clipped=[float(v) for v in mean["mse_clipped"]],
    )
    return res


# ----------------------------------------------------------------------------- shared context
class EvalContext:
    """What the evaluators of one run share: config, mesh, model, sampler, the results store, the
    output directory and writer, stage timings, the feature networks and reference statistics
    (loaded once), and composed from those: ``step_samples`` (`StepSamples`: the samples and
    features of the step being evaluated, drawn once for all FID evaluators) and ``floor``
    (`RealFloor`: the real-data FID floor, computed once)."""

    def __init__(
        self,
        config,
        workdir: str,
        mesh,
        *,
        feature_fn: Optional[Callable] = None,
        network: str = S.FID_NETWORK,
        feature_batch_size: int = S.FEATURE_BATCH_SIZE,
        writer=None,
    ):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.model = factories.create_model(config)
        self.eval_dir = io.join(workdir, "eval")
        self.main = parallel.is_main_process()
        self.store = ResultsStore(io.join(self.eval_dir, "results.json"), main=self.main)
        self.network, self.feature_batch_size, self.writer = network, feature_batch_size, writer
        self.spec = samplers.spec_from_config(config)
        self.chain = samplers.tag(self.spec, config.diffusion.num_timesteps)
        self._feature_fn, self._feature_logits_fn = feature_fn, None
        self.timings: Dict[str, float] = {}  # wall seconds by stage, for the run's summary
        self.references = FidReferences(
            config, self.eval_dir, network, feature_batch_size, self.feature_fn, self.timed
        )
        self.step_samples = StepSamples(
            config,
            mesh,
            self.model,
            self.spec,
            self.chain,
            self.eval_dir,
            network=network,
            feature_batch_size=feature_batch_size,
            feature_fn=self.feature_fn,
            feature_logits_fn=self.feature_logits_fn,
            store=self.store,
            main=self.main,
            # the driver sets ``writer`` after construction: look it up when writing
            write_images=lambda step, images: self.writer.write_images(step, images),
            timed=self.timed,
        )
        self.floor = RealFloor(
            config,
            self.eval_dir,
            reference=self.reference,
            feature_fn=self.feature_fn,
            network=network,
            feature_batch_size=feature_batch_size,
            main=self.main,
            timed=self.timed,
        )

    def timed(self, stage: str, t0: float) -> None:
        """Adds ``time.time() - t0`` to ``timings[stage]``."""
        self.timings[stage] = self.timings.get(stage, 0.0) + time.time() - t0

    # -- networks and references
    def feature_fn(self) -> Callable:
        """``uint8 [B, 299-resizable, 3] -> pool3 [B, 2048]``: the bundled FID Inception network
        (or the ``feature_fn`` given to the run)."""
        if self._feature_fn is None:
            from diffusion.metrics import load_inception_params, make_feature_fn

            t0 = time.time()
            self._feature_fn = make_feature_fn(load_inception_params())
            logging.info("Loaded the FID Inception network (%.1fs)", time.time() - t0)
        return self._feature_fn

    def feature_logits_fn(self) -> Callable:
        """``uint8 [B, H, W, 3] -> (pool3 [B, 2048], logits [B, 1008])`` of the network read from
        ``config.eval.inception_weights`` (its pool3 equals the bundled network's; the logits give
        the Inception Score)."""
        if self._feature_logits_fn is None:
            from diffusion.metrics.inception import (
                load_inception_logits_params,
                make_feature_logits_fn,
            )

            t0 = time.time()
            self._feature_logits_fn = make_feature_logits_fn(
                load_inception_logits_params(self.config.eval.inception_weights)
            )
            logging.info(
                "Loaded the Inception network with logits from %s (%.1fs)",
                self.config.eval.inception_weights,
                time.time() - t0,
            )
        return self._feature_logits_fn

    def reference(self, split: str) -> Tuple[str, fid_lib.ReferenceStatistics]:
        """``(reference split, statistics)`` for FID against ``split`` (`FidReferences.get`)."""
        return self.references.get(split)


# ----------------------------------------------------------------------------- evaluators
class Evaluator(abc.ABC):
    """One metric (abstract: subclasses define ``settings`` and ``evaluate``). ``key``: its entry in a step's results; ``settings(ctx)``: what it depends
    on (a stored value with equal settings is reused); ``evaluate`` computes it, stores it in
    ``entry`` and returns TensorBoard scalars."""

    key: str = ""

    @abc.abstractmethod
    def settings(self, ctx: EvalContext) -> dict:
        """The values this metric depends on (stored with it)."""

    def needed(self, ctx: EvalContext, entry: dict) -> bool:
        return not settings_match(entry.get(self.key), self.settings(ctx))

    @abc.abstractmethod
    def evaluate(self, ctx: EvalContext, step: int, params, entry: dict) -> Dict[str, float]:
        """Computes the metric for ``step``, stores it in ``entry``, returns scalars."""


class FidKidEvaluator(Evaluator):
    """FID and KID of the step's samples against ``split`` (plus IS and the real-data floor for
    the primary split)."""

    def __init__(self, split: str, primary: bool):
        self.split, self.primary = split, primary
        self.key = "fid" if primary else f"fid@{split}"

    def settings(self, ctx):
        c = ctx.config
        return {
            "num_gen": c.eval.num_samples,
            "chain": ctx.chain,
            "clip_denoised": ctx.spec.clip_denoised,
            "seed": c.seed,
            "dataset": c.data.dataset,
            "image_size": c.data.image_size,
            "fid_split": self.split,
            "network": ctx.network,
        }

    def evaluate(self, ctx, step, params, entry):
        c = ctx.config
        feats, logits = ctx.step_samples.features(step, params, entry)
        ref_split, ref = ctx.reference(self.split)
        res = compute_fid_kid(feats, ref)
        n_gen, n_ref = res["num_gen"], res["num_ref"]
        fid = {
            "value": res["fid"],
            "num_gen": n_gen,
            "num_ref": n_ref,
            "ref_split": ref_split,
            "settings": self.settings(ctx),
        }
        kid = {
            "mean": res["kid"],
            "se": res["kid_se"],
            "num_gen": n_gen,
            "num_ref": n_ref,
            "subset_size": res["kid_subset_size"],
            "num_subsets": res["kid_num_subsets"],
        }
        suffix = "" if self.primary else f"_{self.split}"
        out = {
            f"fid_N{n_gen}{suffix}": res["fid"],
            f"kid_N{n_gen}{suffix}": res["kid"],
            f"kid_se_N{n_gen}{suffix}": res["kid_se"],
        }
        floor, is_text = None, ""
        if self.primary:
            ResultsStore.keep_previous(entry, ("fid", "kid"))
            entry["fid"], entry["kid"] = fid, kid
            if logits is not None:
                is_mean, is_std = fid_lib.inception_score_from_logits(
                    logits, num_splits=S.IS_NUM_SPLITS
                )
                entry["inception_score"] = {
                    "mean": is_mean,
                    "std": is_std,
                    "num": len(logits),
                    "num_splits": S.IS_NUM_SPLITS,
                    "weights": os.path.basename(c.eval.inception_weights),
                }
                is_text = "; IS %.3f ± %.3f (%d splits)" % (is_mean, is_std, S.IS_NUM_SPLITS)
                out[f"inception_score_N{n_gen}"] = is_mean
            else:
                entry["inception_score"] = S.IS_NOT_AVAILABLE
                is_text = "; IS " + S.IS_NOT_AVAILABLE
            floor = ctx.floor.get()
            if floor is not None:
                entry["fid"]["real_floor"] = {k: floor[k] for k in ("fid", "kid", "num")} | {
                    "split": floor["settings"]["split"]
                }
                out[f"fid_real_floor_N{floor['num']}"] = floor["fid"]
        else:
            ResultsStore.keep_previous(entry, (self.key,))
            entry[self.key] = dict(fid, kid=kid)
        ctx.store.save()
        logging.info(
            "Step %d: FID@%d = %.3f (N_gen=%d, N_ref=%d, %s/%s, %s chain)%s; "
            "KID@%d = %.5f ± %.5f%s",
            step,
            n_gen,
            res["fid"],
            n_gen,
            n_ref,
            c.data.dataset,
            ref_split,
            ctx.chain,
            ""
            if floor is None
            else "; real-data floor at N=%d: FID %.3f, KID %.5f (%s)"
            % (floor["num"], floor["fid"], floor["kid"], floor["settings"]["split"]),
            n_gen,
            res["kid"],
            res["kid_se"],
            is_text,
        )
        if n_gen < 10_000 and self.primary:
            logging.info(
                "FID is strongly biased at N=%d: compare FIDs only at equal N (the "
                "paper reports N=50000).",
                n_gen,
            )
        return out


class BpdEvaluator(Evaluator):
    """bits/dim of the bound on the first ``eval.bpd_num_examples`` examples of ``split``."""

    def __init__(self, split: str, primary: bool):
        self.split, self.primary = split, primary
        self.key = "bpd" if primary else f"bpd@{split}"

    def settings(self, ctx):
        c = ctx.config
        s = {
            "bpd_split": self.split,
            "bpd_num_examples": c.eval.bpd_num_examples,
            "seed": c.seed,
            "dataset": c.data.dataset,
            "image_size": c.data.image_size,
            "clip_denoised": c.eval.clip_denoised,
        }
        K = int(c.eval.get("bpd_timesteps", 0) or 0)
        if K:  # absent for the full bound: results stored before the option keep matching
            s["bpd_timesteps"] = K
        return s

    def evaluate(self, ctx, step, params, entry):
        from diffusion.data import load_split

        c = ctx.config
        m, split = c.eval.bpd_num_examples, self.split
        try:
            images = load_split(
                c.data.dataset,
                S.bpd_examples_split(split, m),
                data_dir=c.data.data_dir,
                image_size=c.data.image_size,
            )
        except ValueError:  # the split has fewer than m examples: take all of it
            images = load_split(
                c.data.dataset, split, data_dir=c.data.data_dir, image_size=c.data.image_size
            )
        images = images[:m]
        if len(images) < m:
            logging.warning(
                "config.eval.bpd_split: %r has only %d examples (asked for %d)",
                split,
                len(images),
                m,
            )
        K = int(c.eval.get("bpd_timesteps", 0) or 0)
        T = c.diffusion.num_timesteps
        how = (
            f"the full bound, T={T} network calls each"
            if not K
            else f"an unbiased estimate from K={K} random timesteps each, {K + 1} network calls"
        )
        logging.info(
            "Step %d: bits/dim (%s) on %d examples of %s/%s",
            step,
            how,
            len(images),
            c.data.dataset,
            split,
        )
        t0 = time.time()
        res = compute_bpd(
            c, ctx.model, params, images, mesh=ctx.mesh, what=f"step {step} bits/dim on {split}"
        )
        ctx.timed("bits/dim", t0)
        res["split"] = split
        res["settings"] = self.settings(ctx)
        ResultsStore.keep_previous(entry, (self.key,))
        entry[self.key] = res
        ctx.store.save()
        logging.info(
            "Step %d: bits/dim = %.4f ± %.4f on %s (prior %.2e, rate %.4f, distortion "
            "%.4f; N=%d, %s, x̂0 %s, %.1fs)",
            step,
            res["total"],
            res["total_se"],
            split,
            res["prior"],
            res["rate"],
            res["distortion"],
            res["num_examples"],
            "full bound" if not K else f"K={K} timesteps",
            "clipped" if res["clip_denoised"] else "not clipped",
            time.time() - t0,
        )
        suffix = "" if self.primary else f"_{split}"
        return {
            f"bpd{suffix}": res["total"],
            f"bpd_prior{suffix}": res["prior"],
            f"bpd_rate{suffix}": res["rate"],
            f"bpd_distortion{suffix}": res["distortion"],
        }


def evaluators_from_config(config) -> List[Evaluator]:
    """The evaluators ``config.eval`` asks for: FID/KID per split of ``fid_split`` (none when
    ``num_samples = 0``), then bits/dim per split of ``bpd_split`` (none when
    ``bpd_num_examples = 0``)."""
    e = config.eval
    out: List[Evaluator] = []
    if e.num_samples > 0:
        out += [FidKidEvaluator(s, i == 0) for i, s in enumerate(S.split_list(e.fid_split))]
    if e.bpd_num_examples > 0:
        out += [BpdEvaluator(s, i == 0) for i, s in enumerate(S.split_list(e.bpd_split))]
    return out
