"""Tiny generated datasets for tests and smoke runs (never a download)."""

import gzip
import os
import struct

import numpy as np

from experiments import input_pipeline


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an idx file (gzipped if ``path`` ends in .gz)."""
  header = struct.pack(">HBB", 0, 0x08, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(
    directory: str, num_train: int = 256, num_test: int = 64, seed: int = 0
) -> str:
  """Writes learnable Fashion-MNIST-shaped idx files; returns ``directory``.

  Each class is a fixed random template plus noise, so a few steps of
  training already beat chance.
  """
  rng = np.random.default_rng(seed)
  templates = rng.integers(0, 256, (10, 28, 28))
  os.makedirs(directory, exist_ok=True)
  for split, n in (("train", num_train), ("test", num_test)):
    labels = rng.integers(0, 10, n)
    noise = rng.normal(0, 40, (n, 28, 28))
    images = np.clip(templates[labels] + noise, 0, 255)
    image_file, label_file = input_pipeline.IDX_FILES[split]
    write_idx(os.path.join(directory, image_file + ".gz"), images)
    write_idx(os.path.join(directory, label_file + ".gz"), labels)
  return directory
