"""Data: offline TFDS builders (mnist5k, emoji32) and the deterministic input pipeline.

Importing this package registers the offline builders with TFDS, so
``tfds.builder('mnist5k', data_dir=...)`` works afterwards.

Trainer entry points::

    pipeline = create_input_pipeline(config)          # in-memory or streaming
    it = pipeline.iterator(start_step)                 # {'image': f32 [B_local,H,W,C]}
    images = load_split('cifar10', 'test', data_dir=None, image_size=32)  # uint8 [N,H,W,C]
"""

from diffusion.data import builders
from diffusion.data.builders import Emoji32, Mnist5k, prepare_offline
from diffusion.data.pipeline import (
    KNOWN_DATASETS,
    BatchIterator,
    DatasetNotAvailableError,
    DatasetSpec,
    InputPipeline,
    StreamingInputPipeline,
    create_input_pipeline,
    default_data_dir,
    get_builder,
    get_dataset_spec,
    load_split,
    make_batch_fn,
    normalize_images,
    preprocess_image,
)

__all__ = [
    "builders",
    "Emoji32",
    "Mnist5k",
    "prepare_offline",
    "KNOWN_DATASETS",
    "BatchIterator",
    "DatasetNotAvailableError",
    "DatasetSpec",
    "InputPipeline",
    "StreamingInputPipeline",
    "create_input_pipeline",
    "default_data_dir",
    "get_builder",
    "get_dataset_spec",
    "load_split",
    "make_batch_fn",
    "normalize_images",
    "preprocess_image",
]
