"""Exact top-k selection for mask updates: ``lax.top_k`` vs counting.

    python -m benchmarks.selection [--rounds 5]
    python -m benchmarks.selection --update_breakdown [--tree resnet50]

Times, on layer-sized vectors of |Gaussian| scores, the two exact selections
`dynamic_sparse` can use (both mark the k largest, ties to the lower index):
``first_k_of_top`` (``lax.top_k`` over the whole vector) and counting
(``select_top_k`` with its size threshold lowered to 1: a strided sample's
bracket, then one counting pass per step of an interpolation search). Prints
a markdown table of median milliseconds per size and k, interleaved;
`SELECT_MIN_SIZE` in ``sparseopt_jax/_src/dst.py`` is set from it.
``approx_max_k`` is left out: on CPU it lowers to the same sort-based top-k
(61 ms vs 56 ms at k = 70k on 2.4M scores, measured 2026-11-25), and it is
not exact.

``--update_breakdown`` asks how much of a whole RigL mask-update step
(``dynamic_sparse(chain(scale_by_sparseopt(), sgd))`` on a benchmark tree,
ERK 90%, donated) is the search: it times the step as it is, with every
layer's selections done by ``lax.top_k``, and with the counting search
skipped (each layer's thresholds taken from its sample's bracket unchecked:
wrong masks, every other pass of the update kept), against plain momentum
SGD's step.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import sparseopt_jax as sparseopt

from benchmarks import common
from sparseopt_jax._src import dst


def update_breakdown(tree: str, rounds: int):
  """Times RigL's update step as it is, with top_k only, without search."""
  params = common.make_tree(common.tree_shapes(tree))
  masks = sparseopt.init_masks(jax.random.key(1), params, 0.9)
  params = sparseopt.apply_masks(params, masks)
  grads = common.random_grads(params)

  def rigl():
    tx = common.sparse_wrapper(masks)
    return common.update_candidate(tx, tx.init(params), grads, params, 100)

  sgd = optax.sgd(0.1, momentum=0.9)
  cands = {
      "sgd_momentum": common.update_candidate(
          sgd, sgd.init(params), grads, params
      )
  }
  min_size, search = dst.SELECT_MIN_SIZE, dst._kth_key  # pylint: disable=protected-access
  try:
    # Both are looked up when the step is traced, which common.donating's
    # jit does at the first call: trace each variant now.
    cands["rigl_update"] = rigl()
    jax.block_until_ready(cands["rigl_update"][0]())
    dst.SELECT_MIN_SIZE = 1 << 62
    cands["rigl_update_top_k"] = rigl()
    jax.block_until_ready(cands["rigl_update_top_k"][0]())
    dst.SELECT_MIN_SIZE = min_size
    dst._kth_key = lambda key, k, lo, *_: (lo, jnp.int32(key.size))
    cands["rigl_update_no_search"] = rigl()
    jax.block_until_ready(cands["rigl_update_no_search"][0]())
  finally:
    dst.SELECT_MIN_SIZE, dst._kth_key = min_size, search
  times = common.interleaved(cands, rounds)
  print(common.header())
  print()
  print(f"| {tree} RigL update step | median ms | x sgd |")
  print("|---|---:|---:|")
  for name, t in times.items():
    print(f"| {name} | {t * 1e3:.1f} | {t / times['sgd_momentum']:.2f} |")


def selection_table(rounds: int):
  """Median ms of top_k and counting per layer size and k (about 1% and 5%)."""
  print(common.header())
  print()
  print("| scores | k | top_k ms | counting ms | top_k / counting |")
  print("|---:|---:|---:|---:|---:|")
  min_size = dst.SELECT_MIN_SIZE
  dst.SELECT_MIN_SIZE = 1  # Count at every size.
  try:
    for n in (4096, 16384, 36864, 147456, 589824, 2359296):
      scores = jnp.abs(jax.random.normal(jax.random.key(0), (n,)))
      for k in (n // 100, n // 20):
        k32 = jnp.int32(k)
        cands = {
            "top_k": (
                jax.jit(lambda s, k=k, k32=k32: dst.first_k_of_top(s, k, k32)),
                (scores,),
            ),
            "counting": (
                jax.jit(lambda s, k=k, k32=k32: dst.select_top_k(s, k, k32)),
                (scores,),
            ),
        }
        a, b = (cands[c][0](scores) for c in ("top_k", "counting"))
        if not bool(jnp.array_equal(a, b)):
          raise SystemExit(f"selections differ at n={n}, k={k}")
        t = common.interleaved(cands, rounds)
        print(
            f"| {n} | {k} | {t['top_k'] * 1e3:.3f} | "
            f"{t['counting'] * 1e3:.3f} | {t['top_k'] / t['counting']:.1f} |",
            flush=True,
        )
  finally:
    dst.SELECT_MIN_SIZE = min_size


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--update_breakdown", action="store_true")
  parser.add_argument("--tree", default="resnet50")
  args = parser.parse_args()
  if args.update_breakdown:
    update_breakdown(args.tree, args.rounds)
  else:
    selection_table(args.rounds)


if __name__ == "__main__":
  main()
