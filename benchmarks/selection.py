"""Exact top-k selection for mask updates: ``lax.top_k`` vs the sampled threshold.

    python -m benchmarks.selection [--size 2359296] [--rounds 5]

Times, on one layer-sized vector of uniform scores, the two exact selections
`dynamic_sparse` can use (both mark the k largest, ties to the lower index):
``first_k_of_top`` (``lax.top_k`` over the whole vector) and
``select_top_k`` at three sample strides (a strided sample brackets the k-th
score, a ``top_k`` of capacity a few thousand resolves the bracket). Prints a
markdown table of median milliseconds per k; `SELECT_MIN_K` in
``sparseopt_jax/_src/dst.py`` is set from it. ``approx_max_k`` is left out:
on CPU it lowers to the same sort-based top-k (61 ms vs 56 ms at k = 70k on
2.4M scores in the session that wrote this), and it is not exact.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from sparseopt_jax._src import dst


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=2_359_296)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args()
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
