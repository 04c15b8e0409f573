"""The input pipeline: TFDS datasets -> deterministic, resumable, per-process batches.

Two paths, one interface (``.iterator(start_step)`` yielding ``{'image': float32
[B_local, H, W, C]}`` in [-1, 1], ``x / 127.5 - 1``):

* **In memory** (:class:`InputPipeline`, ``config.data.in_memory=True``, the default).
  The whole split is read once into a uint8 NumPy array (CIFAR-10 train: 150 MB;
  mnist5k: 4.6 MB; emoji32: 11 MB). The batch for training step ``s`` is a *pure
  function* of ``(seed, s, process_index, process_count)``:

  - epoch ``e`` visits the split in the order ``default_rng([seed, e]).permutation(N)``;
  - the epoch orders are concatenated, and the global batch of step ``s`` is the slice
    ``[s * B, (s + 1) * B)`` of that infinite stream (a batch may straddle two epochs);
  - process ``p`` of ``P`` takes rows ``[p * B / P, (p + 1) * B / P)`` of the global batch,
    so the union over processes is exactly the single-process batch: a 2-process run
    sees the same data as a 1-process run, step for step;
  - horizontal flips (if ``random_flip``) are drawn for the whole global batch from
    ``default_rng([seed, s, 1])``, so they are process-count invariant too.

  Resuming at step ``k`` costs nothing (no data is skipped or replayed) and gives
  bit-identical batches. A background thread prepares the next 2-4 batches.

* **Streaming** (:class:`StreamingInputPipeline`, ``config.data.in_memory=False``) for
  datasets that do not fit in host memory (CelebA-HQ 256, LSUN). ``tf.data`` reads
  ``tfds.split_for_jax_process(split)``, shuffles with a buffer seeded per epoch
  (``seed``, epoch), repeats, decodes, crops/resizes, flips with a stateless RNG keyed by
  the example's position in the stream, batches ``B / P`` per process and prefetches.
  It is deterministic for a fixed process count, and resuming at step ``k`` skips
  ``k * B / P`` *undecoded* records -- at most one epoch of raw reads, because whole epochs
  before the resume point are jumped over. Unlike the in-memory path its batches
  depend on the process count (each process reads its own shard of files) and the
  shuffle is only as good as the buffer (TFDS shuffles records when it writes them,
  which helps).

Trade-off: in memory is exact, process-count invariant and fast for anything up to a
few GB, but every process holds the whole split in host RAM (and reads it once at
start-up); streaming scales to any size and each process reads only its share, at the
price of those guarantees. For ``jax.make_array_from_process_local_data`` the local
rows of process ``p`` are rows ``[p * B_local, (p + 1) * B_local)`` of the global batch,
matching a 'data' mesh axis whose devices are ordered by process.

Image size: if the stored images are not ``image_size`` x ``image_size``, they are
centre-cropped to a square (a no-op for square data) and resized: area averaging when
shrinking (e.g. LSUN/CelebA-HQ to 64), bilinear when enlarging; then rounded to uint8.
Both paths use the same TensorFlow function (:func:`preprocess_image`).

Nothing here downloads. Online TFDS datasets must already be prepared in ``data_dir``;
otherwise :class:`DatasetNotAvailableError` explains how to provide them.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np

from diffusion import io
from diffusion import rng as _rng
from diffusion.data import builders

__all__ = [
    "DatasetNotAvailableError",
    "DatasetSpec",
    "KNOWN_DATASETS",
    "get_dataset_spec",
    "default_data_dir",
    "get_builder",
    "preprocess_image",
    "load_split",
    "normalize_images",
    "InputPipeline",
    "make_batch_fn",
    "StreamingInputPipeline",
    "BatchIterator",
    "create_input_pipeline",
]

Batch = Dict[str, np.ndarray]


# --------------------------------------------------------------------------- #
# Known datasets
# --------------------------------------------------------------------------- #


class DatasetNotAvailableError(FileNotFoundError):
    """An online TFDS dataset is not prepared in ``data_dir`` (and we never download)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about a dataset name.

    Attributes:
      name: the user-facing name (``config.data.dataset``), e.g. ``'cifar10'``.
      tfds_name: the TFDS name with config, e.g. ``'celeb_a_hq/256'``.
      offline: True if a builder in :mod:`diffusion.data.builders` prepares it locally.
      train_split / eval_split: split names for training and for evaluation (FID
        reference statistics, test bpd).
      native_size: stored square image side, or None for variable-size images (LSUN).
      channels: 1 or 3.
      manual_download: True if even ``tfds build`` needs files placed in ``manual_dir``.
    """

    name: str
    tfds_name: str
    offline: bool
    train_split: str
    eval_split: str
    native_size: Optional[int]
    channels: int
    manual_download: bool = False


def _specs() -> Dict[str, DatasetSpec]:
    s = {}

    def add(name, *args, **kwargs):
        s[name] = DatasetSpec(name, *args, **kwargs)

    add("mnist5k", "mnist5k/pad", True, "train", "test", 32, 1)
    add("mnist5k/pad", "mnist5k/pad", True, "train", "test", 32, 1)
    add("mnist5k/resize", "mnist5k/resize", True, "train", "test", 32, 1)
    add("emoji32", "emoji32", True, "train", "test", 32, 3)
    add("cifar10", "cifar10", False, "train", "test", 32, 3)
    for res in (64, 128, 256, 512, 1024):
        add(
            f"celeb_a_hq/{res}",
            f"celeb_a_hq/{res}",
            False,
            "train",
            "train",
            res,
            3,
            manual_download=True,
        )
    add("celebahq256", "celeb_a_hq/256", False, "train", "train", 256, 3, manual_download=True)
    for cat in ("bedroom", "church_outdoor"):
        add(f"lsun/{cat}", f"lsun/{cat}", False, "train", "validation", None, 3)
    add("lsun/cat", "lsun/cat", False, "train", "train", None, 3)
    add("lsun_bedroom", "lsun/bedroom", False, "train", "validation", None, 3)
    add("lsun_church", "lsun/church_outdoor", False, "train", "validation", None, 3)
    add("lsun_church_outdoor", "lsun/church_outdoor", False, "train", "validation", None, 3)
    add("lsun_cat", "lsun/cat", False, "train", "train", None, 3)
    return s


KNOWN_DATASETS: Dict[str, DatasetSpec] = _specs()


def get_dataset_spec(dataset: str) -> DatasetSpec:
    """Looks up ``config.data.dataset``; raises ValueError listing the known names."""
    if dataset not in KNOWN_DATASETS:
        offline = sorted(n for n, s in KNOWN_DATASETS.items() if s.offline)
        online = sorted(n for n, s in KNOWN_DATASETS.items() if not s.offline)
        raise ValueError(
            f"Unknown dataset {dataset!r} (config.data.dataset). Known datasets: "
            f"offline (built from installed packages): {', '.join(offline)}; "
            f"online TFDS (must be prepared in data_dir beforehand): {', '.join(online)}."
        )
    return KNOWN_DATASETS[dataset]


def default_data_dir() -> str:
    """``$TFDS_DATA_DIR`` if set, else ``~/tensorflow_datasets`` (expanded)."""
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _tf():
    """Imports TensorFlow for data only: hide accelerators so TF never grabs GPU/TPU memory."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
        pass  # Already initialised, or no such device type: nothing to hide.
    return tf


def _not_available_message(spec: DatasetSpec, data_dir: str) -> str:
    base = spec.tfds_name.split("/")[0]
    found = ""
    ds_dir = io.join(data_dir, *spec.tfds_name.split("/"))
    if io.isdir(ds_dir):
        found = (
            f" (found {ds_dir} with {io.listdir(ds_dir)}, but no complete version "
            "matching this TFDS release)"
        )
    lines = [
        f"Dataset {spec.name!r} (TFDS {spec.tfds_name!r}) is not prepared in data_dir "
        f"{data_dir!r}{found}, and this code never downloads at run time.",
        "To provide it:",
        f"  1. On a machine with network access: `pip install tensorflow-datasets` and "
        f"`tfds build {spec.tfds_name} --data_dir=/some/dir`.",
        f"  2. Copy /some/dir/{base} to {os.path.join(data_dir, base)} (keep the "
        "<name>/<config>/<version> layout), or point the run at the folder with "
        "--config.data.data_dir=/some/dir (or the TFDS_DATA_DIR environment variable).",
    ]
    if spec.manual_download:
        lines.append(
            f"  {base} needs a manual download even there: put the source files (e.g. "
            "data256x256.tar for celeb_a_hq/256) in a folder and run "
            f"`tfds build {spec.tfds_name} --manual_dir=<folder> --data_dir=/some/dir`."
        )
    lines.append("Datasets that always work offline: mnist5k, emoji32.")
    return "\n".join(lines)


def get_builder(dataset: str, data_dir: Optional[str] = None):
    """Returns a prepared ``tfds.core.DatasetBuilder`` for a known dataset name.

    Offline datasets (mnist5k, emoji32) are built into ``data_dir`` on first use (a few
    seconds). Online ones must already be there; otherwise raises
    :class:`DatasetNotAvailableError`. Never downloads.
    """
    import tensorflow_datasets as tfds

    spec = get_dataset_spec(dataset)
    data_dir = os.path.expanduser(data_dir) if data_dir else default_data_dir()
    _tf()
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if spec.offline:
        return builders.prepare_offline(builder)
    if not builder.is_prepared():
        raise DatasetNotAvailableError(_not_available_message(spec, data_dir))
    return builder


# --------------------------------------------------------------------------- #
# Reading a whole split (in memory; also what eval / FID code should call)
# --------------------------------------------------------------------------- #


def preprocess_image(image, image_size: int):
    """TF: uint8 [h, w, C] -> uint8 [image_size, image_size, C].

    No-op when the static shape already matches. Otherwise centre-crop to a square of
    side min(h, w), then resize: ``area`` when shrinking, ``bilinear`` when enlarging;
    round and clip to uint8.
    """
    tf = _tf()
    if image.shape[0] == image_size and image.shape[1] == image_size:
        return image
    channels = image.shape[-1]
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    side = tf.minimum(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side]
    size = [image_size, image_size]
    resized = tf.cond(
        side > image_size,
        lambda: tf.image.resize(image, size, method="area"),
        lambda: tf.image.resize(image, size, method="bilinear"),
    )
    out = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    out.set_shape([image_size, image_size, channels])
    return out


def load_split(
    dataset: str,
    split: str,
    *,
    data_dir: Optional[str] = None,
    image_size: Optional[int] = None,
) -> np.ndarray:
    """Reads a whole split into memory.

    Args:
      dataset: a known dataset name (see :data:`KNOWN_DATASETS`), e.g. ``'mnist5k'``.
      split: a TFDS split string, e.g. ``'train'``, ``'test'``, ``'train[:1000]'``.
      data_dir: TFDS data dir; None -> :func:`default_data_dir`.
      image_size: output side; None -> the native size (error for variable-size data).

    Returns:
      uint8 array [N, image_size, image_size, C] in the split's stored order.

    Raises:
      ValueError: unknown dataset or bad image_size.
      DatasetNotAvailableError: an online dataset that is not prepared in data_dir.
    """
    import tensorflow_datasets as tfds

    spec = get_dataset_spec(dataset)
    if image_size is None:
        if spec.native_size is None:
            raise ValueError(f"{dataset!r} has variable-size images: pass image_size.")
        image_size = spec.native_size
    _check_image_size(image_size)
    builder = get_builder(dataset, data_dir)
    tf = _tf()
    ds = builder.as_dataset(
        split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False)
    )
    ds = ds.map(
        lambda ex: preprocess_image(ex["image"], image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    chunks = [np.asarray(x) for x in tfds.as_numpy(ds.batch(1024).prefetch(2))]
    if not chunks:
        return np.zeros((0, image_size, image_size, spec.channels), np.uint8)
    return np.concatenate(chunks, axis=0)


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1] as ``x / 127.5 - 1``."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _check_image_size(image_size) -> None:
    if (
        not isinstance(image_size, (int, np.integer))
        or isinstance(image_size, bool)
        or image_size <= 0
    ):
        raise ValueError(f"config.data.image_size must be a positive int, got {image_size!r}.")


def _check_batch(global_batch_size: int, process_count: int) -> int:
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
        raise ValueError(
            f"config.training.batch_size must be a positive int, got {global_batch_size!r}."
        )
    if process_count <= 0:
        raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if global_batch_size % process_count:
        raise ValueError(
            f"config.training.batch_size={global_batch_size} (the global batch) must be "
            f"divisible by the number of processes ({process_count}); use a multiple of "
            f"{process_count}."
        )
    return global_batch_size // process_count


def _check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"config.seed must be a non-negative int, got {seed!r}.")
    return int(seed)


def _process_defaults(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    return int(process_index), int(process_count)


# --------------------------------------------------------------------------- #
# Background prefetch
# --------------------------------------------------------------------------- #


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


class BatchIterator:
    """Iterator over batches of consecutive steps, made by a background thread.

    ``next(it)`` returns the batch of step ``it.step`` and advances ``it.step``.
    Call :meth:`close` (or use ``with``) to stop the thread early; it is a daemon
    thread, so forgetting to close never blocks interpreter exit.
    """

    def __init__(self, batch_fn: Callable[[int], Batch], start_step: int = 0, prefetch: int = 2):
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.step = int(start_step)
        self._fn = batch_fn
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(self.step,), name="diffusion-data-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, step: int) -> None:
        try:
            while not self._stop.is_set():
                if not self._put(self._fn(step)):
                    return
                step += 1
        except BaseException as e:  # Re-raised in the consumer thread.
            self._put(_Raised(e))

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Batch:
        while True:
            if self._stop.is_set():
                raise StopIteration
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("data prefetch thread died without a result") from None
        if isinstance(item, _Raised):
            self.close()
            raise item.exc
        self.step += 1
        return item

    def close(self) -> None:
        """Stops the background thread (idempotent)."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:  # Interpreter shutdown.
            pass


# --------------------------------------------------------------------------- #
# In-memory pipeline
# --------------------------------------------------------------------------- #


class InputPipeline:
    """Deterministic, resumable, process-count-invariant batches from an in-memory array.

    Args:
      images: uint8 [N, H, W, C], e.g. from :func:`load_split`.
      global_batch_size: B, the batch over all processes (``config.training.batch_size``).
      seed: non-negative int (``config.seed``).
      random_flip: flip each example horizontally with probability 1/2.
      process_index, process_count: default to ``jax.process_index()/process_count()``.
      prefetch: queue length of :meth:`iterator` (2-4).
    """

    def __init__(
        self,
        images: np.ndarray,
        *,
        global_batch_size: int,
        seed: int,
        random_flip: bool,
        process_index: Optional[int] = None,
        process_count: Optional[int] = None,
        prefetch: int = 2,
    ):
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if len(images) == 0:
            raise ValueError("images is empty")
        self.images = images
        self.seed = _check_seed(seed)
        self.random_flip = bool(random_flip)
        self.process_index, self.process_count = _process_defaults(process_index, process_count)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = _check_batch(global_batch_size, self.process_count)
        self.prefetch = prefetch
        self._perm_cache: Dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def num_examples(self) -> int:
        """N, the number of examples in one epoch."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple:
        """(H, W, C)."""
        return tuple(self.images.shape[1:])

    @property
    def steps_per_epoch(self) -> float:
        """N / B (a float: batches straddle epochs)."""
        return self.num_examples / self.global_batch_size

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """int64 [N]: the visiting order of ``epoch``, ``default_rng([seed, epoch]).permutation(N)``."""
        with self._lock:
            perm = self._perm_cache.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples)
                if len(self._perm_cache) >= 4:
                    self._perm_cache.pop(min(self._perm_cache))
                self._perm_cache[epoch] = perm
            return perm

    def global_indices(self, step: int) -> np.ndarray:
        """int64 [B]: dataset rows of the global batch of ``step`` (all processes)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n, b = self.num_examples, self.global_batch_size
        start = int(step) * b
        pos = np.arange(start, start + b, dtype=np.int64)
        epochs, offsets = pos // n, pos % n
        out = np.empty(b, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch_permutation(int(e))[offsets[sel]]
        return out

    def global_flips(self, step: int) -> np.ndarray:
        """bool [B]: which rows of the global batch of ``step`` are flipped."""
        if not self.random_flip:
            return np.zeros(self.global_batch_size, dtype=bool)
        rng = np.random.default_rng([self.seed, int(step), _rng.DATA_FLIP])
        return rng.random(self.global_batch_size) < 0.5

    def local_slice(self) -> slice:
        """This process's rows of the global batch: ``[p * B_local, (p + 1) * B_local)``."""
        b = self.local_batch_size
        return slice(self.process_index * b, (self.process_index + 1) * b)

    def batch(self, step: int) -> Batch:
        """``{'image': float32 [B_local, H, W, C]}`` in [-1, 1] for training step ``step``.

        A pure function of (seed, step, process_index, process_count) and the data.
        """
        sl = self.local_slice()
        idx = self.global_indices(step)[sl]
        flips = self.global_flips(step)[sl]
        x = self.images[idx]  # Fancy indexing copies, so flipping in place is safe.
        if flips.any():
            x[flips] = x[flips, :, ::-1]
        return {"image": normalize_images(x)}

    def iterator(self, start_step: int = 0) -> BatchIterator:
        """Batches of steps start_step, start_step + 1, ... prepared by a background thread."""
        return BatchIterator(self.batch, start_step=start_step, prefetch=self.prefetch)

    def __call__(self, step: int) -> Batch:
        return self.batch(step)


def make_batch_fn(
    images: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    random_flip: bool,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> Callable[[int], Batch]:
    """Returns ``batch_fn(step) -> {'image': float32 [B_local, H, W, C]}`` (see InputPipeline)."""
    return InputPipeline(
        images,
        global_batch_size=global_batch_size,
        seed=seed,
        random_flip=random_flip,
        process_index=process_index,
        process_count=process_count,
    ).batch


# --------------------------------------------------------------------------- #
# Streaming pipeline (tf.data)
# --------------------------------------------------------------------------- #


class StreamingInputPipeline:
    """tf.data pipeline for datasets too big for host memory (CelebA-HQ 256, LSUN).

    Each process reads ``tfds.split_for_jax_process(split, drop_remainder=True)`` (n_p
    examples). Epoch ``e`` shuffles those records with a buffer seeded by
    ``(seed, e)``; epochs are concatenated; example ``g`` of the stream is flipped iff a
    stateless uniform keyed by ``(seed, g, process_index)`` is < 1/2. Batches of
    ``B / P`` are float32 in [-1, 1]. ``iterator(k)`` starts at epoch
    ``k * B_local // n_p`` and skips the remaining records undecoded, so it yields
    exactly the batches k, k+1, ... of ``iterator(0)`` (for the same process count).

    Args:
      dataset, split, data_dir, image_size: as in :func:`load_split`.
      global_batch_size, seed, random_flip, process_index, process_count: as in
        :class:`InputPipeline`.
      shuffle_buffer: records in the shuffle buffer (memory: buffer x encoded size).
      prefetch: batches prefetched by tf.data.
    """

    def __init__(
        self,
        dataset: str,
        split: str,
        *,
        data_dir: Optional[str],
        image_size: int,
        global_batch_size: int,
        seed: int,
        random_flip: bool,
        process_index: Optional[int] = None,
        process_count: Optional[int] = None,
        shuffle_buffer: int = 10_000,
        prefetch: int = 2,
    ):
        import tensorflow_datasets as tfds

        _check_image_size(image_size)
        self.spec = get_dataset_spec(dataset)
        self.seed = _check_seed(seed)
        self.random_flip = bool(random_flip)
        self.process_index, self.process_count = _process_defaults(process_index, process_count)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = _check_batch(global_batch_size, self.process_count)
        self.image_size = int(image_size)
        self.shuffle_buffer = int(shuffle_buffer)
        self.prefetch = prefetch
        self.builder = get_builder(dataset, data_dir)
        self.split = tfds.split_for_jax_process(
            split,
            process_index=self.process_index,
            process_count=self.process_count,
            drop_remainder=True,
        )
        self.num_local_examples = int(self.builder.info.splits[self.split].num_examples)
        if self.num_local_examples < 1:
            raise ValueError(
                f"split {split!r} of {dataset!r} has no examples for process "
                f"{self.process_index} of {self.process_count}."
            )

    @property
    def image_shape(self) -> tuple:
        """(H, W, C)."""
        return (self.image_size, self.image_size, self.spec.channels)

    def as_dataset(self, start_step: int = 0):
        """``tf.data.Dataset`` of ``{'image': float32 [B_local, H, W, C]}`` from ``start_step``."""
        import tensorflow_datasets as tfds

        tf = _tf()
        raw = self.builder.as_dataset(
            split=self.split,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        raw = raw.map(lambda ex: ex["image"])
        n = self.num_local_examples
        seed = self.seed

        def one_epoch(epoch):
            epoch_seed = tf.cast(seed, tf.int64) * 1_000_003 + epoch
            d = raw.shuffle(self.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
            return d.enumerate().map(lambda j, x: (epoch * n + j, x))

        start = int(start_step) * self.local_batch_size
        ds = tf.data.Dataset.range(start // n, 2**62).flat_map(one_epoch)
        ds = ds.skip(start % n)
        feature = self.builder.info.features["image"]
        size, flip, p = self.image_size, self.random_flip, self.process_index

        def decode(g, encoded):
            image = preprocess_image(feature.decode_example(encoded), size)
            if flip:
                u = tf.random.stateless_uniform(
                    [], seed=tf.stack([tf.cast(seed, tf.int64) * 65_537 + p, g])
                )
                image = tf.cond(u < 0.5, lambda: image[:, ::-1], lambda: image)
            return image

        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        ds = ds.map(lambda x: {"image": tf.cast(x, tf.float32) / 127.5 - 1.0})
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(self.prefetch)

    def iterator(self, start_step: int = 0) -> "_StreamIterator":
        """NumPy batches of steps start_step, start_step + 1, ... (tf.data prefetches).

        Same interface as :class:`BatchIterator`: ``.step``, ``.close()``, ``with``.
        """
        import tensorflow_datasets as tfds

        return _StreamIterator(iter(tfds.as_numpy(self.as_dataset(start_step))), start_step)


class _StreamIterator:
    """Wraps a NumPy iterator over a tf.data pipeline with ``.step`` and ``.close()``."""

    def __init__(self, it: Iterator[Batch], start_step: int):
        self._it = it
        self.step = int(start_step)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        self.step += 1
        return batch

    def close(self) -> None:
        """Releases the tf.data iterator (idempotent)."""
        self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- #
# From a config
# --------------------------------------------------------------------------- #


def create_input_pipeline(
    config,
    *,
    split: Optional[str] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    prefetch: int = 2,
):
    """Builds the training input pipeline from an ``ml_collections.ConfigDict``.

    Reads ``config.data.{dataset, image_size, random_flip, data_dir, in_memory}``,
    ``config.training.batch_size`` (global) and ``config.seed``.

    Args:
      split: default: the dataset's train split.
      process_index, process_count: default: ``jax.process_index()/process_count()``.

    Returns:
      :class:`InputPipeline` (``in_memory``, default) or :class:`StreamingInputPipeline`;
      both have ``.iterator(start_step)`` yielding ``{'image': float32 [B_local, H, W, C]}``
      in [-1, 1], ``.local_batch_size`` and ``.image_shape``.
    """
    data = config.data
    spec = get_dataset_spec(data.dataset)
    split = split or spec.train_split
    image_size = data.get("image_size", None) or spec.native_size
    process_index, process_count = _process_defaults(process_index, process_count)
    _check_batch(config.training.batch_size, process_count)  # Fail before reading data.
    kwargs = dict(
        global_batch_size=config.training.batch_size,
        seed=config.seed,
        random_flip=bool(data.get("random_flip", True)),
        process_index=process_index,
        process_count=process_count,
    )
    if data.get("in_memory", True):
        images = load_split(
            data.dataset, split, data_dir=data.get("data_dir", None), image_size=image_size
        )
        return InputPipeline(images, prefetch=prefetch, **kwargs)
    return StreamingInputPipeline(
        data.dataset,
        split,
        data_dir=data.get("data_dir", None),
        image_size=image_size,
        prefetch=prefetch,
        **kwargs,
    )
