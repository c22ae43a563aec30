"""Exact top-k selection for mask updates: ``lax.top_k`` vs the sampled threshold.

    python -m benchmarks.selection [--size 2359296] [--rounds 5]
    python -m benchmarks.selection --update_breakdown [--tree resnet50]

Times, on one layer-sized vector of uniform scores, the two exact selections
`dynamic_sparse` can use (both mark the k largest, ties to the lower index):
``first_k_of_top`` (``lax.top_k`` over the whole vector) and
``select_top_k`` at three sample strides (a strided sample brackets the k-th
score, a ``top_k`` of capacity a few thousand resolves the bracket). Prints a
markdown table of median milliseconds per k; `SELECT_MIN_K` in
``sparseopt_jax/_src/dst.py`` is set from it. ``approx_max_k`` is left out:
on CPU it lowers to the same sort-based top-k (61 ms vs 56 ms at k = 70k on
2.4M scores in the session that wrote this), and it is not exact.

``--update_breakdown`` asks how much of a whole RigL mask-update step
(``dynamic_sparse(chain(scale_by_sparseopt(), sgd))`` on a benchmark tree,
ERK 90%, donated) is selection: it times the step as it is, with every
selection done by ``lax.top_k``, and with every selection replaced by a
no-op (``scores > 1e30``: nothing dropped or grown, every other pass of
the update kept), against plain momentum SGD's step.
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
  """Times RigL's update step with real, top_k-only and no-op selection."""
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
  select = dst.select_top_k
  try:
    # The selection is looked up when the step is traced, which
    # common.donating's jit does at the first call: trace each variant now.
    cands["rigl_update"] = rigl()
    jax.block_until_ready(cands["rigl_update"][0]())
    dst.select_top_k = dst.first_k_of_top
    cands["rigl_update_top_k"] = rigl()
    jax.block_until_ready(cands["rigl_update_top_k"][0]())
    dst.select_top_k = lambda s, k_max, k: s > 1e30
    cands["rigl_update_no_selection"] = rigl()
    jax.block_until_ready(cands["rigl_update_no_selection"][0]())
  finally:
    dst.select_top_k = select
  times = common.interleaved(cands, rounds)
  print(common.header())
  print()
  print(f"| {tree} RigL update step | median ms | x sgd |")
  print("|---|---:|---:|")
  for name, t in times.items():
    print(f"| {name} | {t * 1e3:.1f} | {t / times['sgd_momentum']:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=2_359_296)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--update_breakdown", action="store_true")
  parser.add_argument("--tree", default="resnet50")
  args = parser.parse_args()
  if args.update_breakdown:
    update_breakdown(args.tree, args.rounds)
    return
  scores = jax.random.uniform(jax.random.key(0), (args.size,))
  strides = (8, 16, 32)
  print(common.header())
  print()
  print(
      "| k | top_k ms | "
      + " | ".join(f"threshold s={s} ms" for s in strides)
      + " |"
  )
  print("|---:|---:|" + "---:|" * len(strides))
  min_k, stride = dst.SELECT_MIN_K, dst.SAMPLE_STRIDE
  dst.SELECT_MIN_K = 1  # Take the threshold path at every k.
  try:
    for k in (8000, 15000, 30000, 45000, 70000, 140000):
      k32 = jnp.int32(k)
      top_k = jax.jit(lambda s, k=k, k32=k32: dst.first_k_of_top(s, k, k32))
      cands = {"top_k": (top_k, (scores,))}
      times = common.interleaved(cands, args.rounds)
      row = [f"{times['top_k'] * 1e3:.1f}"]
      for s in strides:
        # The stride is read at trace time: one compiled function per stride.
        dst.SAMPLE_STRIDE = s
        fn = jax.jit(lambda x, k=k, k32=k32: dst.select_top_k(x, k, k32))
        got = common.interleaved({"t": (fn, (scores,))}, args.rounds)["t"]
        row.append(f"{got * 1e3:.1f}")
      dst.SAMPLE_STRIDE = stride
      print(f"| {k} | " + " | ".join(row) + " |", flush=True)
  finally:
    dst.SELECT_MIN_K, dst.SAMPLE_STRIDE = min_k, stride


if __name__ == "__main__":
  main()
