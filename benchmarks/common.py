"""Shared benchmark plumbing: synthetic parameter trees and interleaved timing.

Timings are medians over interleaved rounds (every candidate runs once per
round, in an order that rotates from round to round) after compilation and
warm-up, so slow drifts of the machine hit every candidate alike and ratios
are measured side by side.
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparseopt_jax as sparseopt


def resnet20_shapes() -> list[tuple[int, ...]]:
  """Kernel shapes of a CIFAR ResNet-20 (0.27M parameters)."""
  shapes = [(3, 3, 3, 16)]
  cin = 16
  for cout in (16, 32, 64):
    for block in range(3):
      shapes.append((3, 3, cin, cout))
      shapes.append((3, 3, cout, cout))
      if cin != cout and block == 0:
        shapes.append((1, 1, cin, cout))
      cin = cout
  shapes.append((64, 100))
  return shapes


def resnet50_shapes() -> list[tuple[int, ...]]:
  """Kernel shapes of an ImageNet ResNet-50 (25.5M parameters)."""
  shapes = [(7, 7, 3, 64)]
  cin = 64
  for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
    for b in range(blocks):
      shapes += [
          (1, 1, cin, width),
          (3, 3, width, width),
          (1, 1, width, 4 * width),
      ]
      if b == 0:
        shapes.append((1, 1, cin, 4 * width))
      cin = 4 * width
  shapes.append((2048, 1000))
  return shapes


def wide_shapes(total: int = 100_000_000) -> list[tuple[int, ...]]:
  """About ``total`` parameters as 3x3 convolutions with 512 channels."""
  per = 3 * 3 * 512 * 512
  return [(3, 3, 512, 512)] * max(1, total // per)


def rows_of(shapes: Callable[[], list[tuple[int, ...]]]):
  """The tree of ``shapes`` with every kernel cut to one row (its last axis).

  The same leaves, so the same pytrees of state pass into and out of each
  step, at a thousandth of the bytes: its step times are what passing
  those buffers costs the host per call, apart from the work on them.
  """
  return lambda: [(1,) * (len(s) - 1) + s[-1:] for s in shapes()]


TREES = {
    "resnet20": resnet20_shapes,
    "resnet50": resnet50_shapes,
    "resnet50_rows": rows_of(resnet50_shapes),
    "100M": wide_shapes,
}


def tree_shapes(name: str) -> list[tuple[int, ...]]:
  """The shapes of a named tree (case-insensitive); a clear error if unknown."""
  by_lower = {k.lower(): fn for k, fn in TREES.items()}
  if name.lower() not in by_lower:
    raise SystemExit(
        f"--trees: unknown tree {name!r}; choose from " f"{', '.join(TREES)}."
    )
  return by_lower[name.lower()]()


def make_tree(
    shapes: Sequence[tuple[int, ...]], seed: int = 0, with_bn: bool = True
) -> dict:
  """A Flax-like params dict: one kernel per shape, plus BN scale/bias."""
  rng = np.random.default_rng(seed)
  params = {}
  for i, shape in enumerate(shapes):
    layer = {
        "kernel": jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    }
    if with_bn:
      layer["scale"] = jnp.ones(shape[-1], jnp.float32)
      layer["bias"] = jnp.zeros(shape[-1], jnp.float32)
    params[f"layer_{i:03d}"] = layer
  return params


def random_grads(params, scale: float = 0.01, seed: int = 9):
  """Dense Gaussian gradients like ``params``, nonzero at pruned positions too.

  Real gradients are dense; RigL ranks the inactive positions by them. A
  gradient derived from the masked params (zero wherever a weight is
  pruned) would make every growth candidate tie at 0, which ``lax.top_k``
  ranks faster than real scores: mask updates would time optimistically.
  """
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef,
      [
          scale * jax.random.normal(k, x.shape, x.dtype)
          for k, x in zip(keys, leaves)
      ],
  )


def num_params(tree) -> int:
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def state_bytes(tree) -> int:
  """Bytes held by the leaves of a pytree of arrays or ``ShapeDtypeStruct``s.

  Works on the result of ``jax.eval_shape(tx.init, params)``, so a large
  optimizer state can be measured without allocating it.
  """
  return sum(
      # x.dtype.itemsize, not np.dtype(...): PRNG key dtypes are not numpy's.
      int(np.size(x)) * x.dtype.itemsize
      for x in jax.tree.leaves(tree)
  )


def added_state_bytes_per_param(state, inner_state, params) -> float:
  """Optimizer-state bytes per parameter that ``state`` holds beyond ``inner_state``.

  ``state`` is a wrapper's optimizer state (e.g. ``dynamic_sparse``'s, with
  its masks, ever-active union, counts, key and, inside its inner chain,
  ``scale_by_sparseopt``'s factor cache) and ``inner_state`` the state of
  the plain optimizer it stands in for (e.g. ``optax.sgd(lr, momentum)``'s);
  the difference is what the wrapper costs in memory, divided by the number
  of parameters (all leaves of ``params``, dense ones included).
  """
  return (state_bytes(state) - state_bytes(inner_state)) / num_params(params)


def timed(fn: Callable, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def interleaved(
    candidates: dict[str, tuple[Callable, tuple]],
    rounds: int = 9,
    warmup: int = 2,
) -> dict[str, float]:
  """Median seconds per call of each candidate (see `interleaved_samples`)."""
  return {
      name: statistics.median(t)
      for name, t in interleaved_samples(candidates, rounds, warmup).items()
  }


def interleaved_samples(
    candidates: dict[str, tuple[Callable, tuple]],
    rounds: int = 9,
    warmup: int = 2,
) -> dict[str, list[float]]:
  """Seconds per call of each candidate, one sample per interleaved round.

  Every round runs every candidate once, starting from a different one each
  round, so slow drifts of the machine and position effects hit all alike.
  """
  for fn, args in candidates.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times: dict[str, list[float]] = {name: [] for name in candidates}
  names = list(candidates)
  for r in range(rounds):
    # Rotate the order each round, so no candidate always runs first (after
    # the Python loop) or right after the same neighbour.
    for name in names[r % len(names) :] + names[: r % len(names)]:
      fn, args = candidates[name]
      times[name].append(timed(fn, *args))
  return times


def donating(
    fn: Callable,
    args: Sequence,
    carried: Sequence[int],
    fix: Callable[[tuple], tuple] = lambda out: out,
    inputs: Sequence[Sequence] = (),
) -> tuple[Callable, tuple]:
  """A candidate that donates its state and feeds the result back, as training does.

  ``fn(*args)`` is jitted with ``args[i]`` donated for ``i`` in ``carried``
  and must return a tuple whose first ``len(carried)`` entries are their new
  values; each call passes those back in. Donation lets XLA update buffers
  in place, which changes what a step costs (and which copies it makes), so
  steps are timed the way a training loop runs them. ``fix`` maps the new
  values before they are carried (e.g. to reset a step counter so every call
  times the same kind of step). ``inputs``: arguments for the positions not
  carried, a tuple per call in turn (``args``' own first), so successive
  calls see new values there, as successive training steps do.

  Returns:
    ``(call, ())``, an entry for :func:`interleaved`.
  """
  jitted = jax.jit(fn, donate_argnums=tuple(carried))
  args = list(args)
  for i in carried:  # Own copies: donation deletes what it is given.
    args[i] = jax.tree.map(jnp.copy, args[i])

  free = [i for i in range(len(args)) if i not in carried]
  turns = [tuple(args[i] for i in free), *inputs]
  calls = itertools.count()

  def call():
    for i, value in zip(free, turns[next(calls) % len(turns)]):
      args[i] = value
    out = jitted(*args)
    for i, new in zip(carried, fix(tuple(out[: len(carried)]))):
      args[i] = new
    return out

  return call, ()


def sparse_wrapper(masks, method: str = "rigl", inner=None):
  """The benchmarks' ``dynamic_sparse(chain(scale_by_sparseopt(), inner))``.

  ``inner`` defaults to momentum SGD; mask updates every 100 steps until step
  10,000, so a counter of 100 makes a mask-update step and 1 a normal one.
  """
  inner = optax.sgd(0.1, 0.9) if inner is None else inner
  return sparseopt.dynamic_sparse(
      optax.chain(sparseopt.scale_by_sparseopt(), inner),
      masks,
      method=method,
      update_every=100,
      end_step=10_000,
      key=jax.random.key(0),
  )


def update_candidate(
    tx,
    state,
    grads,
    params,
    count: int | None = None,
    inputs=(),
    apply: bool = False,
):
  """``tx.update`` as a donating candidate (see `donating`): state carried.

  With ``count``, the state's step counter is set to it before every call,
  so every call times the same kind of step (normal, or a mask update).
  ``inputs``: further ``(grads, params)`` pairs, taken in turn after the
  given ones. ``apply``: the step also applies the updates to the params,
  which it is given and returns (donated and carried, as in a train step:
  XLA then writes the new params in place instead of returning the updates
  in a fresh buffer each call).
  """
  if apply and inputs:
    raise ValueError(
        "update_candidate: apply=True carries the params; "
        "inputs would replace them."
    )

  def step(state, g, p):
    updates, state = tx.update(g, state, p)
    return state, updates

  def step_applied(state, p, g):
    updates, state = tx.update(g, state, p)
    return state, optax.apply_updates(p, updates)

  if count is not None:
    state = state._replace(count=jnp.int32(count))

  def fix(out):
    if count is None:
      return out
    return (out[0]._replace(count=jnp.int32(count)), *out[1:])

  if apply:
    return donating(step_applied, (state, params, grads), (0, 1), fix)
  return donating(
      step, (state, grads, params), carried=(0,), fix=fix, inputs=inputs
  )


def header() -> str:
  """One line naming the date, machine and versions, for result tables."""
  dev = jax.devices()[0]
  return (
      f"Measured {datetime.date.today().isoformat()} on "
      f"{jax.device_count()} x {dev.platform.upper()} "
      f"({getattr(dev, 'device_kind', '?')}; host {platform.machine()}, "
      f"{os.cpu_count()} cores), jax {jax.__version__}."
  )
