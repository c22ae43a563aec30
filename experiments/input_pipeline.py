"""Data for the SparseOpt experiments: sources, deterministic batching, augmentation.

Sources are random-access: `ArraySource` holds a small dataset in memory
(Fashion-MNIST read from idx files), `TfdsSource` wraps
``tfds.data_source(...)`` (array_record, no TensorFlow needed) for
``fashion_mnist``, ``cifar10``, ``cifar100`` and ``imagenet2012``.

Batching uses grain's `MapDataset` over example *indices*: a per-epoch
shuffle seeded by ``(seed, epoch)`` and repeated forever, so the global batch
at step ``t`` is a pure function of ``(seed, t)``. Resuming a run is therefore
"start the iterator at the step stored in the checkpoint"; no iterator state
needs to be saved. Each process reads only its share of every global batch
(examples ``process_index::process_count``), so the union over processes is
the same global batch whatever the number of hosts.

Augmentation for fixed-size images (CIFAR pad-4 crop + flip) runs on the
accelerator inside the jitted train step (`augment`), from a per-step PRNG
key: the host only ships uint8 pixels. ImageNet images have variable sizes,
so random-resized-crop + flip (train) and resize + center crop (eval) happen
on the host, per example, with grain threads and a generator seeded by
``(seed, example position)``.
"""

import dataclasses
import gzip
import os
import struct
from typing import Any
from collections.abc import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset.

  Attributes:
    num_classes: number of labels.
    image_shape: (height, width, channels) of model inputs.
    mean: per-channel mean of the training pixels, in [0, 255] units.
    std: per-channel standard deviation, in [0, 255] units.
    train_split: tfds name of the training split.
    test_split: tfds name of the evaluation split.
    variable_size: images have different sizes and are cropped on the host.
  """

  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str = "train"
  test_split: str = "test"
  variable_size: bool = False


DATASETS = {
    "fashion_mnist": DatasetSpec(10, (28, 28, 1), (72.94,), (90.02,)),
    "cifar10": DatasetSpec(
        10, (32, 32, 3), (125.31, 122.95, 113.87), (62.99, 62.09, 66.70)
    ),
    "cifar100": DatasetSpec(
        100, (32, 32, 3), (129.30, 124.07, 112.43), (68.17, 65.39, 70.42)
    ),
    "imagenet2012": DatasetSpec(
        1000,
        (224, 224, 3),
        (123.675, 116.28, 103.53),
        (58.395, 57.12, 57.375),
        test_split="validation",
        variable_size=True,
    ),
}


class ArraySource:
  """An in-memory dataset: uint8 images (N, H, W, C) and int labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    self.images = images
    self.labels = labels.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``indices``, stacked."""
    return {"image": self.images[indices], "label": self.labels[indices]}


class TfdsSource:
  """A ``tfds.data_source`` split, reduced to its image and label."""

  def __init__(self, source: Sequence[dict[str, Any]]):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[int(index)]
    return {
        "image": np.asarray(record["image"]),
        "label": np.int32(record["label"]),
    }

  def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``indices``, stacked (fixed-size images only)."""
    # One read per example: tfds' batched __getitems__ fails under
    # tfds.testing.mock_data, and array_record reads are cheap either way.
    records = [self.source[int(i)] for i in indices]
    return {
        "image": np.stack([np.asarray(r["image"]) for r in records]),
        "label": np.array([r["label"] for r in records], np.int32),
    }


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train and a test source with their `DatasetSpec`."""

  name: str
  spec: DatasetSpec
  train: Any
  test: Any


def read_idx(path: str) -> np.ndarray:
  """Reads an idx file (the MNIST format), gzipped or not, as uint8."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path} is not a uint8 idx file.")
  shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != np.prod(shape):
    raise ValueError(f"{path}: header says {shape}, found {array.size} bytes.")
  return array.reshape(shape)


def _find_idx(directory: str, stem: str) -> str | None:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def load_fashion_mnist_idx(
    directory: str,
) -> tuple[ArraySource, ArraySource] | None:
  """Train and test `ArraySource` from idx files in ``directory``, or None."""
  splits = []
  for split in ("train", "test"):
    paths = [_find_idx(directory, stem) for stem in IDX_FILES[split]]
    if None in paths:
      return None
    images, labels = (read_idx(p) for p in paths)
    splits.append(ArraySource(images[..., None], labels))
  return tuple(splits)


def _missing_dataset_message(name: str, data_dir: str | None) -> str:
  where = data_dir or "the default tfds data_dir (~/tensorflow_datasets)"
  if name == "fashion_mnist":
    return (
        f"Fashion-MNIST not found: no idx files in "
        f"{data_dir or DEBIAN_FASHION_MNIST_DIR} and no tfds copy in {where}. "
        "Get it with `sudo apt-get install dataset-fashion-mnist` (Debian/"
        "Ubuntu, installs the idx files to /usr/share/datasets/fashion-mnist),"
        " or put the four *-ubyte(.gz) files in a folder passed as "
        "--config.data_dir, or `tfds build fashion_mnist "
        "--file_format=array_record`."
    )
  return (
      f"Dataset {name!r} not found in {where}. Prepare it once with "
      f"`tfds build {name} --file_format=array_record "
      f"[--data_dir=DIR]` (ImageNet needs the manual download, see "
      "https://www.tensorflow.org/datasets/catalog/imagenet2012) and pass "
      "--config.data_dir=DIR."
  )


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
  """Opens ``name`` for random access.

  Fashion-MNIST is read from idx files in ``data_dir`` (or Debian's
  ``/usr/share/datasets/fashion-mnist`` when ``data_dir`` is None) into
  memory; otherwise, and for every other dataset, through
  ``tfds.data_source`` (array_record) without downloading.

  Raises:
    FileNotFoundError: the data is not on this machine; the message says how
      to get it.
  """
  if name not in DATASETS:
    raise ValueError(
        f"Unknown dataset {name!r}; choose from {sorted(DATASETS)}."
    )
  spec = DATASETS[name]
  if name == "fashion_mnist":
    splits = load_fashion_mnist_idx(data_dir or DEBIAN_FASHION_MNIST_DIR)
    if splits is not None:
      return Dataset(name, spec, *splits)
  import tensorflow_datasets as tfds  # Slow import; only needed here.

  try:
    train, test = (
        tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        for split in (spec.train_split, spec.test_split)
    )
  except Exception as e:  # tfds raises several unrelated types here.
    raise FileNotFoundError(_missing_dataset_message(name, data_dir)) from e
  return Dataset(name, spec, TfdsSource(train), TfdsSource(test))


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
) -> np.ndarray:
  """Inception-style crop (area and aspect ratio sampled), resized, random flip."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  height, width = image.shape[:2]
  area = height * width
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = rng.integers(0, height - h + 1)
      left = rng.integers(0, width - w + 1)
      break
  else:  # Fall back to the central square, as torchvision does.
    h = w = min(height, width)
    top, left = (height - h) // 2, (width - w) // 2
  crop = Image.fromarray(image[top : top + h, left : left + w])
  crop = np.asarray(crop.resize((size, size), Image.BICUBIC))
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def center_crop(
    image: np.ndarray, size: int, fraction: float = 0.875
) -> np.ndarray:
  """Central ``fraction`` of the shorter side, resized to ``size`` squared."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  height, width = image.shape[:2]
  side = int(round(min(height, width) * fraction))
  top, left = (height - side) // 2, (width - side) // 2
  crop = Image.fromarray(image[top : top + side, left : left + side])
  return np.asarray(crop.resize((size, size), Image.BICUBIC))


def _gray_to_rgb(image: np.ndarray) -> np.ndarray:
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def train_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of the training batches from ``start_step`` on.

  Batch ``t`` holds the shuffled examples ``[t * B, (t + 1) * B)`` of an
  endless stream that reshuffles every epoch with seed ``seed + epoch``; the
  last partial batch of an epoch spills into the next epoch rather than being
  dropped, so every example is seen equally often.

  Args:
    dataset: from `load_dataset`.
    global_batch_size: examples per step over all processes; must divide by
      ``process_count``.
    seed: data-order seed.
    start_step: first step to yield (resume point).
    image_size: output side for variable-size datasets (ImageNet).
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    num_threads: grain reader threads.

  Yields:
    dicts with ``image`` uint8 (B / process_count, H, W, C) and ``label``
    int32.
  """
  if global_batch_size % process_count:
    raise ValueError(
        f"Batch size {global_batch_size} does not divide over "
        f"{process_count} processes."
    )
  local_batch = global_batch_size // process_count
  source = dataset.train
  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  ds = ds[process_index::process_count]
  if dataset.spec.variable_size:
    size = image_size or dataset.spec.image_shape[0]
    ds = ds.map(lambda i: source[i]).random_map(
        lambda r, rng: {
            "image": random_resized_crop(_gray_to_rgb(r["image"]), rng, size),
            "label": r["label"],
        },
        seed=seed,
    )
    ds = ds.batch(local_batch)
  else:
    ds = ds.batch(local_batch).map(source.gather)
  ds = ds[start_step:]
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(options))


def eval_batches(
    dataset: Dataset,
    *,
    global_batch_size: int,
    image_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """The whole test split once, in order, padded to full global batches.

  Padding examples repeat the last example and carry ``mask == 0``, so sums
  weighted by ``mask`` count every test example exactly once.
  """
  source = dataset.test
  n = len(source)
  for start in range(0, n, global_batch_size):
    positions = np.arange(start, start + global_batch_size)
    positions = positions[process_index::process_count]
    indices = np.minimum(positions, n - 1)
    if dataset.spec.variable_size:
      size = image_size or dataset.spec.image_shape[0]
      records = [source[i] for i in indices]
      batch = {
          "image": np.stack(
              [center_crop(_gray_to_rgb(r["image"]), size) for r in records]
          ),
          "label": np.array([r["label"] for r in records], np.int32),
      }
    else:
      batch = source.gather(indices)
    batch["mask"] = (positions < n).astype(np.float32)
    yield batch


def augment(images: jax.Array, key: jax.Array, mode: str) -> jax.Array:
  """Random pad-4 crop and horizontal flip, per example, on device.

  Args:
    images: (B, H, W, C) batch, any dtype.
    key: PRNG key for this batch.
    mode: ``"crop_flip"`` (CIFAR standard) or ``"none"``.
  """
  if mode == "none":
    return images
  if mode != "crop_flip":
    raise ValueError(f"Unknown augmentation {mode!r}.")
  batch, height, width, channels = images.shape
  pad = 4
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k_y, k_x, k_flip = jax.random.split(key, 3)
  ys = jax.random.randint(k_y, (batch,), 0, 2 * pad + 1)
  xs = jax.random.randint(k_x, (batch,), 0, 2 * pad + 1)
  crop = jax.vmap(
      lambda im, y, x: jax.lax.dynamic_slice(
          im, (y, x, 0), (height, width, channels)
      )
  )
  images = crop(padded, ys, xs)
  flip = jax.random.bernoulli(k_flip, 0.5, (batch, 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def normalize(
    images: jax.Array, spec: DatasetSpec, dtype=jnp.float32
) -> jax.Array:
  """uint8 pixels to per-channel standardised ``dtype``."""
  mean = jnp.asarray(spec.mean, jnp.float32)
  std = jnp.asarray(spec.std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
