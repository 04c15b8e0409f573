"""``config.eval``: validation (every problem at once, each naming the field) and the splits the
metrics use. Imports nothing above the maths/I-O layer, so `config_check` can call it."""

from __future__ import annotations

from typing import List, Optional

from diffusion import io, samplers

__all__ = [
    "eval_config_problems",
    "split_list",
    "fid_reference_split",
    "real_floor_split",
    "bpd_examples_split",
    "IS_NOT_AVAILABLE",
    "IS_NUM_SPLITS",
    "FID_NETWORK",
    "DEFAULT_FID_NUM_REFERENCE",
    "KID_NUM_SUBSETS",
    "KID_SUBSET_SIZE",
    "FEATURE_BATCH_SIZE",
    "GRID_SIZE",
]

IS_NOT_AVAILABLE = (
    "not computed: the bundled FID Inception weights stop at pool3 (the network "
    "itself has a 1008-way logits layer); set config.eval.inception_weights to "
    "pytorch-fid's pt_inception-2015-12-05-6726825d.pth, which includes it"
)
IS_NUM_SPLITS = 10  # Salimans et al. (2016); the paper's 9.46 ± 0.11
FID_NETWORK = "fid_inception_2015_12_05"
DEFAULT_FID_NUM_REFERENCE = 50_000  # reference images when the split is larger (CIFAR10: 50k)
KID_NUM_SUBSETS = 100  # Binkowski et al. / stylegan2-ada defaults
KID_SUBSET_SIZE = 1000
FEATURE_BATCH_SIZE = 100  # images per Inception call (one compiled shape)
GRID_SIZE = 64  # samples in the evaluate-mode grid PNG


def split_list(value: str) -> List[str]:
    """``'train, test[:1000]'`` -> ``['train', 'test[:1000]']``: a metric's splits, the first
    being the primary one (stored under the metric's plain name, e.g. ``fid``)."""
    return [s.strip() for s in str(value).split(",") if s.strip()]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def eval_config_problems(config, *, num_devices: int = 1, process_count: int = 1) -> List[str]:
    """Problems with ``config.eval`` (and ``config.sample``) as one-line messages naming the
    field (empty when valid)."""
    e, p = config.eval, []
    T = config.diffusion.num_timesteps
    n = e.num_samples
    if not _is_int(n) or n < 0 or n == 1:
        p.append(
            f"config.eval.num_samples={n!r} is out of range; allowed: 0 (skip FID/KID) or an "
            "integer >= 2"
        )
    elif n % process_count:
        p.append(
            f"config.eval.num_samples={n} must be divisible by the number of processes "
            f"{process_count}"
        )
    b = e.batch_size
    if not _is_int(b) or b < 1:
        p.append(f"config.eval.batch_size={b!r} is out of range; allowed: an integer >= 1")
    elif b % num_devices:
        p.append(
            f"config.eval.batch_size={b} (the global batch) must be divisible by the number "
            f"of devices {num_devices}; use a multiple of {num_devices}"
        )
    p.extend(samplers.config_problems(config))
    m = e.bpd_num_examples
    if not _is_int(m) or m < 0:
        p.append(
            f"config.eval.bpd_num_examples={m!r} is out of range; allowed: 0 (skip bits/dim) "
            "or a positive integer"
        )
    kt = e.get("bpd_timesteps", 0)
    if not _is_int(kt) or kt < 0 or (_is_int(T) and kt > T - 1):
        p.append(
            f"config.eval.bpd_timesteps={kt!r} is out of range; allowed: 0 (the full bound, "
            f"T={T} network calls per example) or 1..{T - 1} (an unbiased estimate from K "
            "random timesteps per example, with its standard error)"
        )
    if e.checkpoints not in ("latest", "all"):
        p.append(
            f"config.eval.checkpoints={e.checkpoints!r} is not allowed; choose one of "
            "['all', 'latest']"
        )
    w = e.get("inception_weights")
    if w is not None and (not isinstance(w, str) or not io.isfile(io.absolute(w))):
        p.append(
            f"config.eval.inception_weights={w!r} is not a file; give the path of "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (downloaded by hand) or "
            "leave it unset (no Inception Score)"
        )
    floor = e.get("real_floor_split", "auto")
    if not isinstance(floor, str):
        p.append(
            f"config.eval.real_floor_split={floor!r} must be 'auto', '' (skip) or a TFDS "
            "split string such as 'test[:512]'"
        )
    for f in ("fid_split", "bpd_split"):
        v = e[f]
        if not isinstance(v, str) or not split_list(v):
            p.append(
                f"config.eval.{f}={v!r} must be a TFDS split string, e.g. 'train' or "
                "'test[:1000]', or several separated by commas ('train,test')"
            )
    if not isinstance(e.clip_denoised, bool):
        p.append(f"config.eval.clip_denoised={e.clip_denoised!r} must be True or False")
    return p


def fid_reference_split(config, split: Optional[str] = None) -> str:
    """The TFDS split of the FID reference images: ``split`` (default: the first of
    ``config.eval.fid_split``), or its first `DEFAULT_FID_NUM_REFERENCE` images when the whole
    split is larger (a split given with a slice or a '+' is used as it is)."""
    from diffusion.data import get_builder

    split = split or split_list(config.eval.fid_split)[0]
    if "[" in split or "+" in split:
        return split
    n = get_builder(config.data.dataset, config.data.data_dir).info.splits[split].num_examples
    return f"{split}[:{DEFAULT_FID_NUM_REFERENCE}]" if n > DEFAULT_FID_NUM_REFERENCE else split


def real_floor_split(config) -> Optional[str]:
    """The split whose real images give the FID "floor" printed beside the model's FID: real
    images scored exactly like the samples (same N, resolution, network and reference).
    ``config.eval.real_floor_split``: ``'auto'`` (the first ``num_samples`` images of the split
    that is not the (primary) reference split: ``test`` when FID is against ``train``, else
    ``train``), a TFDS split string, or ``''`` to skip."""
    s = config.eval.get("real_floor_split", "auto")
    if not s or config.eval.num_samples <= 0:
        return None
    if s != "auto":
        return s
    primary = split_list(config.eval.fid_split)[0]
    other = "test" if primary.split("[")[0].strip() == "train" else "train"
    return f"{other}[:{config.eval.num_samples}]"


def bpd_examples_split(split: str, num_examples: int) -> str:
    """The split to read for the bound: ``split`` as given when sliced, else its first
    ``num_examples`` (``'test'`` -> ``'test[:M]'``)."""
    return split if ("[" in split or "+" in split) else f"{split}[:{num_examples}]"
