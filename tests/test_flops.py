"""FLOPs accounting (`experiments.flops`) against counts done by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import sparseopt_jax as sparseopt

from experiments import flops


class _ConvNet(nn.Module):
  """One 3x3 conv (with bias) and one dense head: the test's small conv net.

  The conv is unpadded (VALID, 10x10 -> 8x8): with SAME padding XLA leaves
  out the multiply-adds with the zero padding, which the textbook count
  includes (`test_same_padding_counts_only_real_inputs`).
  """

  padding: str = "VALID"

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(4, (3, 3), padding=self.padding, name="conv")(x))
    return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


def _layers(padding="VALID", size=10):
  model = _ConvNet(padding)
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)))
  return flops.kernel_flops(model, variables, (size, size, 1))


def test_kernel_flops_match_hand_counts():
  # Conv: 2 * H_out * W_out * kh * kw * Cin * Cout; dense: 2 * in * out.
  assert _layers() == {
      "conv/kernel": 2 * 8 * 8 * 3 * 3 * 1 * 4,  # 4608
      "head/kernel": 2 * (8 * 8 * 4) * 10,  # 5120
  }


def test_same_padding_counts_only_real_inputs():
  # 8x8 SAME: per axis, the 2 border outputs see 2 of the 3 taps, 6 see 3.
  assert _layers("SAME", 8)["conv/kernel"] == 2 * (2 + 6 * 3 + 2) ** 2 * 1 * 4


def test_kernel_paths_are_the_mask_paths():
  model = _ConvNet()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 10, 10, 1)))
  masks = sparseopt.init_masks(
      jax.random.key(1), variables["params"], 0.5, "uniform"
  )
  assert set(flops.densities(masks)) == set(_layers())


# The hand computation below uses F_conv = 4608, F_head = 5120, the conv at
# density 0.5 and the head dense: f_D = 9728, f_S = 2304 + 5120 = 7424.
_DENSITY = {"conv/kernel": 0.5}


def test_inference_and_static_training_by_hand():
  out = flops.run_flops(
      method="static",
      layers=_layers(),
      final_density=_DENSITY,
      total_steps=10,
      batch_size=2,
  )
  assert out["inference_dense"] == 9728
  assert out["inference_sparse"] == 7424
  assert out["training"] == 3 * 7424 * 10 * 2
  assert out["training_dense"] == 3 * 9728 * 10 * 2
  assert out["training_ratio"] == pytest.approx(7424 / 9728)


def test_rigl_pays_a_dense_gradient_at_each_mask_update():
  out = flops.run_flops(
      method="rigl",
      layers=_layers(),
      final_density=_DENSITY,
      total_steps=10,
      batch_size=2,
      num_mask_updates=3,
  )
  # 7 sparse steps at 3 f_S, 3 mask updates at 2 f_S + f_D.
  assert out["training"] == (7 * 3 * 7424 + 3 * (2 * 7424 + 9728)) * 2


def test_dense_run_costs_dense_flops():
  out = flops.run_flops(
      method="dense",
      layers=_layers(),
      final_density={},
      total_steps=5,
      batch_size=4,
  )
  assert out["inference_ratio"] == 1.0 and out["training_ratio"] == 1.0


def test_gmp_density_follows_the_cubic_schedule():
  out = flops.run_flops(
      method="gmp",
      layers=_layers(),
      final_density=_DENSITY,
      total_steps=8,
      batch_size=1,
      gmp_steps=(2, 6),
      update_every=2,
  )
  # Pruning at updates 2 (r=0), 4 (r=7/8), 6 (r=1): updates 0-4 run dense,
  # 5-6 at conv density 1 - 7/8 * 0.5 = 0.5625, 7 at 0.5.
  by_hand = 3 * (5 * 9728 + 2 * (0.5625 * 4608 + 5120) + 7424)
  assert out["training"] == pytest.approx(by_hand)
  assert out["inference_sparse"] == 7424


def test_pruning_schedule_matches_the_wrappers_counts():
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  tx = sparseopt.gradual_pruning(
      optax.sgd(0.1),
      0.5,
      start_step=2,
      end_step=6,
      update_every=2,
      distribution="uniform",
  )
  state = tx.init(params)
  for count in range(8):
    kept = int(sparseopt.get_masks(state)["w"].sum())  # Masks of this update.
    r = (
        sparseopt.pruning_schedule(
            0.5, start_step=2, end_step=6, update_every=2
        )(count)
        / 0.5
    )
    assert kept == 128 - np.floor(r * 64), count
    updates, state = tx.update(params, state, params)
    params = optax.apply_updates(params, updates)
