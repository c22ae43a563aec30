"""Do bit-packed masks pay? A masked step reading 1-byte vs 1-bit masks.

    python -m benchmarks.packed_masks [--trees resnet50,100M] [--rounds 9]

``dynamic_sparse`` keeps each mask as a ``bool`` array (1 byte per
parameter). Packing 8 entries per byte (``jnp.packbits``) saves 7/8 of that
memory, and a step that reads the mask reads 7/8 fewer mask bytes, but it
must unpack (a shift and an ``and`` per entry) before it can use them. This
times the part of a normal step that the mask touches, side by side in one
process (interleaved rounds, donated state), on a benchmark tree with ERK
90% masks:

* ``momentum``: plain momentum SGD's update, ``m = 0.9 m + g``,
  ``u = -lr m`` (no mask: the floor);
* ``bool_mask``: the same with the gradient and the update masked by a
  ``bool`` mask, as a normal step of ``dynamic_sparse`` does;
* ``packed_mask``: the same with the mask unpacked inside the step from
  ``jnp.packbits`` bytes (``jnp.unpackbits`` with the leaf's entry count).

All three emit the same updates (checked before timing). Prints a markdown
table of medians, ratios to ``momentum`` and the mask's bytes per parameter.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import sparseopt_jax as sparseopt
from benchmarks import common

LR = 0.1


def _unpack(packed: jax.Array, like: jax.Array) -> jax.Array:
  bits = jnp.unpackbits(packed, count=like.size)
  return bits.reshape(like.shape).astype(bool)


def _step(mask_of):
  """A momentum step whose mask per leaf is ``mask_of(mask_leaf, param)``."""

  def step(momentum, grads, masks, params):
    def leaf(m, g, k, p):
      if k is None:
        new_m = 0.9 * m + g
        return new_m, -LR * new_m
      mask = mask_of(k, p)
      new_m = 0.9 * m + jnp.where(mask, g, 0.0)
      return new_m, jnp.where(mask, -LR * new_m, 0.0)

    pairs = jax.tree.map(
        leaf, momentum, grads, masks, params, is_leaf=lambda x: x is None
    )
    is_pair = lambda x: isinstance(x, tuple)
    new_m = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
    updates = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
    return new_m, updates

  return step


def candidates(params, masks, grads):
  """The three steps as donating candidates, and their per-leaf masks."""
  none_masks = jax.tree.map(lambda m: None, masks, is_leaf=lambda x: x is None)
  packed = jax.tree.map(
      lambda m: None if m is None else jnp.packbits(m.reshape(-1)),
      masks,
      is_leaf=lambda x: x is None,
  )
  momentum = jax.tree.map(jnp.zeros_like, params)
  steps = {
      "momentum": (_step(None), none_masks),
      "bool_mask": (_step(lambda k, p: k), masks),
      "packed_mask": (_step(_unpack), packed),
  }
  out = {}
  for name, (step, m) in steps.items():
    out[name] = common.donating(
        step, (momentum, grads, m, params), carried=(0,)
    )
  return out, steps, momentum


def check_same_updates(steps, momentum, grads, params):
  """The bool and packed steps emit identical updates and momenta."""
  (bool_step, bool_masks), (packed_step, packed_masks) = (
      steps["bool_mask"],
      steps["packed_mask"],
  )
  want = jax.jit(bool_step)(momentum, grads, bool_masks, params)
  got = jax.jit(packed_step)(momentum, grads, packed_masks, params)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run(tree_names, rounds):
  print(common.header())
  print()
  print("| tree | params | step | median ms | x momentum | mask B/param |")
  print("|---|---:|---|---:|---:|---:|")
  for name in tree_names:
    params = common.make_tree(common.tree_shapes(name))
    masks = sparseopt.init_masks(jax.random.key(1), params, 0.9)
    params = sparseopt.apply_masks(params, masks)
    grads = common.random_grads(params)
    n = common.num_params(params)
    cands, steps, momentum = candidates(params, masks, grads)
    check_same_updates(steps, momentum, grads, params)
    mask_bytes = {
        label: common.state_bytes(m) / n for label, (_, m) in steps.items()
    }
    times = common.interleaved(cands, rounds)
    for label, t in times.items():
      print(
          f"| {name} | {n / 1e6:.2f}M | {label} | {t * 1e3:.3f} | "
          f"{t / times['momentum']:.2f} | {mask_bytes[label]:.3f} |",
          flush=True,
      )
    del params, masks, grads, cands, steps, momentum


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trees", default="resnet50,100M")
  parser.add_argument("--rounds", type=int, default=9)
  args = parser.parse_args()
  run(args.trees.split(","), args.rounds)


if __name__ == "__main__":
  main()
