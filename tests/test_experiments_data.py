"""Tests of experiments.input_pipeline: readers, determinism, augmentation."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import fake_data
from experiments import input_pipeline as ip


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
  directory = fake_data.write_fashion_mnist(
      str(tmp_path_factory.mktemp("fmnist")), num_train=64, num_test=21
  )
  return ip.load_dataset("fashion_mnist", directory)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
  array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
  path = str(tmp_path / f"x-idx3-ubyte{suffix}")
  fake_data.write_idx(path, array)
  np.testing.assert_array_equal(ip.read_idx(path), array)


def test_idx_rejects_other_formats(tmp_path):
  path = tmp_path / "bad"
  path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")  # float32 code.
  with pytest.raises(ValueError, match="not a uint8 idx file"):
    ip.read_idx(str(path))


def test_fashion_mnist_from_idx(fmnist):
  assert (len(fmnist.train), len(fmnist.test)) == (64, 21)
  batch = fmnist.train.gather(np.array([3, 1]))
  assert batch["image"].shape == (2, 28, 28, 1)
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32


def test_missing_data_error_names_the_fix(tmp_path):
  with pytest.raises(
      FileNotFoundError, match="apt-get install dataset-fashion"
  ):
    ip.load_dataset("fashion_mnist", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tfds build cifar100"):
    ip.load_dataset("cifar100", str(tmp_path))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batch_is_a_function_of_seed_and_step(fmnist):
  full = _take(ip.train_batches(fmnist, global_batch_size=8, seed=3), 12)
  resumed = _take(
      ip.train_batches(fmnist, global_batch_size=8, seed=3, start_step=9), 3
  )
  for a, b in zip(full[9:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other = next(ip.train_batches(fmnist, global_batch_size=8, seed=4))
  assert not np.array_equal(other["image"], full[0]["image"])


def test_each_epoch_is_a_new_permutation(fmnist):
  # 64 examples, batch 8: steps 0-7 are epoch 0, steps 8-15 epoch 1.
  batches = _take(ip.train_batches(fmnist, global_batch_size=8, seed=0), 16)
  flat = lambda bs: np.concatenate([b["image"].reshape(8, -1) for b in bs])
  epoch0, epoch1 = flat(batches[:8]), flat(batches[8:])
  everything = fmnist.train.images.reshape(64, -1)
  for epoch in (epoch0, epoch1):
    assert sorted(map(bytes, epoch)) == sorted(map(bytes, everything))
  assert not np.array_equal(epoch0, epoch1)


def test_processes_split_every_global_batch(fmnist):
  whole = _take(
      ip.train_batches(fmnist, global_batch_size=8, seed=1, start_step=7), 2
  )
  parts = [
      _take(
          ip.train_batches(
              fmnist,
              global_batch_size=8,
              seed=1,
              start_step=7,
              process_index=p,
              process_count=2,
          ),
          2,
      )
      for p in (0, 1)
  ]
  for step in range(2):
    assert parts[0][step]["label"].shape == (4,)
    union = np.concatenate([parts[0][step]["image"], parts[1][step]["image"]])
    assert sorted(map(bytes, union.reshape(8, -1))) == sorted(
        map(bytes, whole[step]["image"].reshape(8, -1))
    )


def test_eval_covers_every_example_once(fmnist):
  batches = list(ip.eval_batches(fmnist, global_batch_size=8))
  assert len(batches) == 3  # 21 examples: 8 + 8 + 5 real, 3 padding.
  masks = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert masks.sum() == 21 and masks[:21].all()
  np.testing.assert_array_equal(labels[:21], fmnist.test.labels)


def test_augment_is_a_seeded_crop_and_flip():
  images = (
      np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3)).astype(np.uint8)
  )
  key = jax.random.PRNGKey(0)
  out = np.asarray(ip.augment(images, key, "crop_flip"))
  assert out.shape == images.shape and out.dtype == images.dtype
  np.testing.assert_array_equal(out, ip.augment(images, key, "crop_flip"))
  assert not np.array_equal(out, images)
  # Every output is a window of the zero-padded (maybe flipped) input.
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for img, src in zip(out, padded):
    assert any(
        np.array_equal(s[y : y + 8, x : x + 8], img)
        for s in (src, src[:, ::-1])
        for y in range(9)
        for x in range(9)
    )
  np.testing.assert_array_equal(ip.augment(images, key, "none"), images)


def test_normalize_is_per_channel():
  spec = ip.DATASETS["cifar10"]
  images = np.broadcast_to(np.array(spec.mean, np.float32), (1, 2, 2, 3))
  np.testing.assert_allclose(ip.normalize(images, spec), 0.0, atol=1e-5)


def test_tfds_sources_on_mock_data():
  with tfds.testing.mock_data(num_examples=6):
    cifar = ip.load_dataset("cifar100")
    batch = next(ip.train_batches(cifar, global_batch_size=4, seed=0))
    assert batch["image"].shape == (4, 32, 32, 3)
    imagenet = ip.load_dataset("imagenet2012")
    batch = next(
        ip.train_batches(imagenet, global_batch_size=2, seed=0, image_size=16)
    )
    assert batch["image"].shape == (2, 16, 16, 3)
    batch = next(ip.eval_batches(imagenet, global_batch_size=4, image_size=16))
    assert batch["image"].shape == (4, 16, 16, 3)


def test_random_resized_crop_is_seeded():
  image = (
      np.random.default_rng(0).integers(0, 255, (40, 30, 3)).astype(np.uint8)
  )
  crop = lambda seed: ip.random_resized_crop(
      image, np.random.default_rng(seed), 12
  )
  assert crop(0).shape == (12, 12, 3)
  np.testing.assert_array_equal(crop(0), crop(0))
  assert not np.array_equal(crop(0), crop(1))
  assert ip.center_crop(image, 12).shape == (12, 12, 3)
