"""FID of generators that know (almost) nothing, at the same N and against the same reference as
a run: the yardstick that says whether a model's FID@N means it draws digits at all.

    python -m experiments.trivial_baselines --num 128          # prints the three FIDs

At small N and 16×16, FID has no absolute meaning; these three generators, fitted to the training
images, give it one:

* ``mean_digit``: the per-pixel mean training image, ``num`` times (no diversity at all: what a
  model whose samples have collapsed onto one image scores at best);
* ``pixel_gaussian``: each pixel drawn independently from a Gaussian with that pixel's training
  mean and variance (first and second moments per pixel, no structure across pixels);
* ``full_gaussian``: one Gaussian with the training images' full pixel covariance (all pairwise
  pixel correlations: blurred strokes, no digits).

Each is rounded and clipped to 0..255 like a model's samples. `experiments.table2_curves` stores
them in its record and counts a row's samples as usable only when they beat ``mean_digit``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NAMES = ("mean_digit", "pixel_gaussian", "full_gaussian")


def baseline_images(train: np.ndarray, num: int, seed: int = 0) -> Dict[str, np.ndarray]:
    """The three trivial generators' samples.

    Args:
      train: training images ``[M, H, W, C]`` in 0..255 (uint8 or float).
      num: samples per generator (N).
      seed: NumPy seed of the two Gaussian draws.

    Returns:
      ``{name: uint8 [num, H, W, C]}`` for `NAMES`: the mean image repeated; independent
      per-pixel Gaussians N(μ_p, σ_p²); one Gaussian N(μ, Σ) with Σ the [HWC, HWC] pixel
      covariance of ``train`` (float64). Each rounded and clipped to 0..255.
    """
    shape = train.shape[1:]
    flat = np.asarray(train, np.float64).reshape(len(train), -1)
    mu, sd = flat.mean(0), flat.std(0)
    rng = np.random.default_rng(seed)
    draws = {
        "mean_digit": np.repeat(mu[None], num, 0),
        "pixel_gaussian": mu + sd * rng.standard_normal((num, flat.shape[1])),
        "full_gaussian": rng.multivariate_normal(
            mu, np.cov(flat, rowvar=False), size=num, method="eigh"
        ),
    }
    return {
        k: np.clip(np.round(v), 0, 255).astype(np.uint8).reshape((num,) + shape)
        for k, v in draws.items()
    }


def trivial_baselines(
    num: int = 128,
    *,
    dataset: str = "mnist5k",
    image_size: int = 16,
    train_split: str = "train",
    ref_split: str = "train[:1000]",
    seed: int = 0,
    data_dir: Optional[str] = None,
    feature_fn=None,
    network: str = "fid_inception_2015_12_05",
) -> Dict[str, Any]:
    """FID/KID@``num`` of `baseline_images` (fitted to ``train_split``) against ``ref_split``,
    the reference `experiments.table2_curves` runs use (its cached statistics are reused).

    ``feature_fn`` (``uint8 [B, H, W, 3] -> [B, d]``) defaults to the FID Inception network;
    another one must come with its own ``network`` name, the key of the reference cache.

    Returns ``{'num', 'ref_split', 'train_split', 'seed', 'fid': {name: float},
    'kid': {name: float}}``.
    """
    from diffusion.data import load_split
    from diffusion.evaluation.references import compute_fid_kid, reference_cache_dir, to_rgb
    from diffusion.metrics import fid as fid_lib

    if feature_fn is None:
        from diffusion.metrics.inception.features import make_feature_fn

        feature_fn = make_feature_fn()
    train = load_split(dataset, train_split, data_dir=data_dir, image_size=image_size)
    ref_images = load_split(dataset, ref_split, data_dir=data_dir, image_size=image_size)
    try:
        cache = reference_cache_dir(data_dir, network)
    except OSError:
        cache = None
    ref = fid_lib.reference_statistics(
        f"{dataset}_{image_size}px",
        ref_split,
        feature_fn,
        images=to_rgb(ref_images),
        cache_dir=cache,
        network=network,
    )
    out: Dict[str, Any] = {"num": num, "ref_split": ref_split, "train_split": train_split,
                           "seed": seed, "fid": {}, "kid": {}}  # fmt: skip
    for name, images in baseline_images(train, num, seed).items():
        feats = fid_lib.extract_features(to_rgb(images), feature_fn, batch_size=64)
        r = compute_fid_kid(feats, ref)
        out["fid"][name], out["kid"][name] = r["fid"], r["kid"]
        logging.info("trivial baseline %s: FID@%d %.1f, KID %.4f", name, num, r["fid"], r["kid"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    b = trivial_baselines(a.num, seed=a.seed, data_dir=a.data_dir)
    for name in NAMES:
        print(f"{name}: FID@{a.num} {b['fid'][name]:.2f}, KID {b['kid'][name]:.4f}")


if __name__ == "__main__":
    main()
