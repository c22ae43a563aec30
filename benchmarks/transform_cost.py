"""Cost of the sparse transforms per step, against plain SGD and the memory floor.

    python -m benchmarks.transform_cost [--trees resnet20,resnet50,100M]

(``resnet50_rows``: ResNet-50's leaves cut to one row each, which times the
host's per-call cost of the same pytrees: see ``common.rows_of``.)

For each parameter tree (90% sparse masks, ERK), times one jitted update of:

* ``floor``: ``jax.tree.map`` reading grads + masks and writing one output,
  the memory-bound floor of any mask-aware transform (9 bytes/param);
* ``scale_by_sparseopt`` (masks as an update keyword, counted every call);
* ``scale_by_sparseopt_cached`` (masks plus ``masks_updated=False``, as
  ``dynamic_sparse`` forwards between mask updates: the factors cached in
  the transform's state are reused);
* ``zero_masked_updates`` (the apply-masks transform);
* ``sgd_momentum``: plain ``optax.sgd(0.1, momentum=0.9)``;
* ``dst_step``: ``dynamic_sparse(chain(scale_by_sparseopt(), sgd))`` on a
  step that is not a mask update, and ``static_step`` the same with
  ``method="static"``;
* ``rigl_update`` / ``set_update``: the same wrapper on a mask-update step;
  the masks carry over from call to call but the params and gradients do
  not change, so each update after the first finds the weights it grew
  still at zero and none left below the previous drop threshold (a clump
  and a gap at the k-th score that training would fill in);
* ``rigl_update_fresh`` / ``set_update_fresh``: the same, with new params
  and gradients in each call (three sets in turn; the new params are dense
  Gaussian draws), so no update sees what the previous one left, as after
  the steps of training between two updates;
* ``sgd_momentum_applied``, ``dst_step_applied``, ``static_step_applied``:
  those steps followed by ``optax.apply_updates``, the params donated and
  carried as in a train step (their "x sgd" is relative to
  ``sgd_momentum_applied``): the new params are written in place, where the
  rows above return the updates in a fresh buffer per call;
* ``adam`` and ``dst_adam_step``: plain ``optax.adam`` and the RigL wrapper
  around ``chain(scale_by_sparseopt(), adam)`` on a normal step, whose
  "x sgd" column is relative to ``adam`` (its floor).

The stateful candidates (``sgd_momentum`` and the ``dynamic_sparse`` steps)
donate their optimizer state and carry it from call to call, as a training
step does: in-place updates and the copies XLA inserts around the mask
update's ``lax.cond`` both depend on donation.

Prints a markdown table: median time, GB/s at the floor's 9 bytes/param, ns
per parameter, ratios to the floor and to SGD, and the optimizer-state bytes
per parameter each candidate keeps beyond ``sgd_momentum``'s (computed once
from the state's shapes, not timed): for the ``dynamic_sparse`` rows the
masks, ever-active union, counts, key and ``scale_by_sparseopt``'s factor
cache; for ``scale_by_sparseopt`` its own cache, which it adds to whatever
optimizer it is chained with.
"""

from __future__ import annotations

import argparse

import jax
import optax

import sparseopt_jax as sparseopt
from benchmarks import common

FLOOR_BYTES_PER_PARAM = 9  # f32 grad read + bool mask read + f32 write.


def candidates(params, masks, grads, fresh=()):
  """The jitted functions to time, with their arguments.

  ``fresh``: further ``(grads, params)`` pairs for the ``*_fresh`` rows.
  """
  floor = jax.jit(lambda g, m: sparseopt.apply_masks(g, m))

  scale = sparseopt.scale_by_sparseopt()
  scale_state = scale.init(params)
  scale_fn = jax.jit(lambda g, s, p, m: scale.update(g, s, p, masks=m)[0])
  cached_state = scale.update(grads, scale_state, params, masks=masks)[1]
  cached_fn = jax.jit(
      lambda g, s, p, m: scale.update(g, s, p, masks=m, masks_updated=False)[0]
  )

  zero = sparseopt.zero_masked_updates()
  zero_state = zero.init(params)
  zero_fn = jax.jit(lambda g, s, p, m: zero.update(g, s, p, masks=m)[0])

  def carrying(tx, count=None, inputs=(), apply=False):
    return common.update_candidate(
        tx, tx.init(params), grads, params, count, inputs, apply
    )

  def dst(method, count, inner=None, inputs=(), apply=False):
    # As in a train step: the state is donated and carried from call to
    # call, with the counter reset so that every call is the same kind of
    # step (normal, or a mask update).
    tx = common.sparse_wrapper(masks, method, inner)
    return carrying(tx, count, inputs, apply)

  out = {
      "floor": (floor, (grads, masks)),
      "scale_by_sparseopt": (scale_fn, (grads, scale_state, params, masks)),
      "scale_by_sparseopt_cached": (
          cached_fn,
          (grads, cached_state, params, masks),
      ),
      "zero_masked_updates": (zero_fn, (grads, zero_state, params, masks)),
      "sgd_momentum": carrying(optax.sgd(0.1, momentum=0.9)),
      "dst_step": dst("rigl", 1),
      "static_step": dst("static", 1),
      "rigl_update": dst("rigl", 100),
      "set_update": dst("set", 100),
      "rigl_update_fresh": dst("rigl", 100, inputs=fresh),
      "set_update_fresh": dst("set", 100, inputs=fresh),
      "sgd_momentum_applied": carrying(
          optax.sgd(0.1, momentum=0.9), apply=True
      ),
      "dst_step_applied": dst("rigl", 1, apply=True),
      "static_step_applied": dst("static", 1, apply=True),
      "adam": carrying(optax.adam(1e-3)),
      "dst_adam_step": dst("rigl", 1, optax.adam(1e-3)),
  }
  return out


def extra_state_bytes(params, masks):
  """State bytes per param of each candidate beyond ``sgd_momentum``'s.

  From ``jax.eval_shape`` of each ``init``: nothing is allocated or timed.
  ``floor`` keeps no state (``None``); ``sgd_momentum`` is the baseline (0).
  """
  sgd = optax.sgd(0.1, momentum=0.9)
  sgd_state = jax.eval_shape(sgd.init, params)
  dst = common.sparse_wrapper(masks)
  dst_bytes = common.added_state_bytes_per_param(
      jax.eval_shape(dst.init, params), sgd_state, params
  )
  scale_bytes = common.added_state_bytes_per_param(
      jax.eval_shape(sparseopt.scale_by_sparseopt().init, params), (), params
  )
  zero_bytes = common.added_state_bytes_per_param(
      jax.eval_shape(sparseopt.zero_masked_updates().init, params), (), params
  )
  return {
      "floor": None,
      "scale_by_sparseopt": scale_bytes,
      "scale_by_sparseopt_cached": scale_bytes,
      "zero_masked_updates": zero_bytes,
      "sgd_momentum": 0.0,
      # SET and RigL keep the same state; only the timed step differs.
      "dst_step": dst_bytes,
      "static_step": dst_bytes,
      "rigl_update": dst_bytes,
      "set_update": dst_bytes,
      "rigl_update_fresh": dst_bytes,
      "set_update_fresh": dst_bytes,
      "sgd_momentum_applied": 0.0,
      "dst_step_applied": dst_bytes,
      "static_step_applied": dst_bytes,
      # Beyond adam's own state (the rows above are beyond sgd_momentum's).
      "adam": None,
      "dst_adam_step": dst_bytes,
  }


def baseline(name: str) -> str:
  """The row a candidate's "x sgd" column divides by."""
  if "adam" in name:
    return "adam"
  return "sgd_momentum_applied" if name.endswith("_applied") else "sgd_momentum"


def run(tree_names, rounds):
  shapes = {name: common.tree_shapes(name) for name in tree_names}
  print(common.header())
  print()
  print(
      "| tree | params | transform | median ms | GB/s @9B/param | ns/param "
      "| x floor | x sgd | +state B/param |"
  )
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
  for name in tree_names:
    params = common.make_tree(shapes[name])
    masks = sparseopt.init_masks(jax.random.key(1), params, 0.9)
    params = sparseopt.apply_masks(params, masks)
    grads = common.random_grads(params)
    fresh = []
    for seed in (1, 2):
      p = common.make_tree(shapes[name], seed)
      fresh.append((common.random_grads(p, seed=seed), p))
    n = common.num_params(params)
    extra = extra_state_bytes(params, masks)
    times = common.interleaved(candidates(params, masks, grads, fresh), rounds)
    for tname, t in times.items():
      gbps = FLOOR_BYTES_PER_PARAM * n / t / 1e9
      print(
          f"| {name} | {n / 1e6:.2f}M | {tname} | {t * 1e3:.3f} | "
          f"{gbps:.1f} | {t / n * 1e9:.3f} | {t / times['floor']:.2f} | "
          f"{t / times[baseline(tname)]:.2f} | "
          f"{'-' if extra[tname] is None else f'{extra[tname]:.3f}'} |",
          flush=True,
      )
    del params, masks, grads, fresh


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trees", default="resnet20,resnet50,100M")
  parser.add_argument("--rounds", type=int, default=9)
  args = parser.parse_args()
  run(args.trees.split(","), args.rounds)


if __name__ == "__main__":
  main()
