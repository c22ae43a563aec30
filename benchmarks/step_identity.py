"""Do two versions of the library train bit-identically? (Numerics of a refactor.)

    git archive <rev> sparseopt_jax | tar -x -C /tmp/old
    python -m benchmarks.step_identity --old=/tmp/old [--steps 300]

Runs the same jitted training loop (a small conv + MLP tree, 80% ERK masks,
a mask update every 10 steps) with the library under ``--old`` and with the
one in this checkout, for RigL/SET/static/GMP, unstructured and structured
masks, momentum SGD (with weight decay and SparseOpt) and Adam, and prints
whether params and the whole optimizer state are bit-identical; where not,
the first differing leaves with their count and largest gap in ulps.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _import(root: str | None):
  for name in [m for m in sys.modules if m.startswith("sparseopt_jax")]:
    del sys.modules[name]
  if root:
    sys.path.insert(0, root)
  try:
    return importlib.import_module("sparseopt_jax")
  finally:
    if root:
      sys.path.remove(root)


def run(lib, method, inner_name, structure, steps):
  keys = jax.random.split(jax.random.key(0), 6)
  params = {
      "a": {
          "kernel": jax.random.normal(keys[0], (3, 3, 8, 16)),
          "bias": jnp.zeros(16),
      },
      "b": {"kernel": jax.random.normal(keys[1], (64, 32))},
      "c": {"kernel": jax.random.normal(keys[2], (32, 10))},
  }
  sparsity = 0.5 if isinstance(structure, tuple) else 0.8
  masks = lib.init_masks(keys[3], params, sparsity, structure=structure)
  params = lib.apply_masks(params, masks)
  inner = {
      "sgd": optax.chain(
          lib.scale_by_sparseopt(),
          optax.add_decayed_weights(1e-3),
          optax.sgd(0.1, 0.9),
      ),
      "adam": optax.adam(1e-2),
  }[inner_name]
  if method == "gmp":
    tx = lib.gradual_pruning(
        inner, 0.9, start_step=20, end_step=200, update_every=10
    )
  else:
    tx = lib.dynamic_sparse(
        inner,
        masks,
        method=method,
        update_every=10,
        end_step=250,
        key=keys[4],
        structure=structure,
    )
  x = jax.random.normal(keys[5], (32, 72))

  def loss(p, x):
    h = x @ p["a"]["kernel"].reshape(72, 16) + p["a"]["bias"]
    h = jnp.tanh(jnp.concatenate([h] * 4, -1))
    return jnp.mean((jnp.tanh(h @ p["b"]["kernel"]) @ p["c"]["kernel"]) ** 2)

  @jax.jit
  def step(p, s, x):
    updates, s = tx.update(jax.grad(loss)(p, x), s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for t in range(steps):
    params, state = step(params, state, x + 0.01 * t)

  def host(v):
    if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
      v = jax.random.key_data(v)
    return np.asarray(v)

  return jax.tree_util.tree_flatten_with_path(
      jax.tree.map(host, (params, state))
  )[0]


CASES = [
    ("rigl", "sgd", "unstructured"),
    ("set", "sgd", "unstructured"),
    ("static", "sgd", "unstructured"),
    ("rigl", "sgd", "constant_fan_in"),
    ("gmp", "sgd", "unstructured"),
    ("rigl", "adam", "unstructured"),
    ("set", "adam", "unstructured"),
    ("rigl", "adam", (2, 4)),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--old", required=True)
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  for case in CASES:
    old = run(_import(args.old), *case, args.steps)
    new = run(_import(None), *case, args.steps)
    diffs = []
    for (path, a), (_, b) in zip(old, new, strict=True):
      if not np.array_equal(a, b):
        if a.dtype == np.float32:
          gap = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32))
          diffs.append(
              f"{jax.tree_util.keystr(path)}: {(a != b).sum()} "
              f"entries, max {gap.max()} ulp"
          )
        else:
          diffs.append(f"{jax.tree_util.keystr(path)}: {(a != b).sum()}")
    print(" ".join(map(str, case)), "bit-identical" if not diffs else "DIFFERS")
    for d in diffs[:4]:
      print("   ", d)


if __name__ == "__main__":
  main()
