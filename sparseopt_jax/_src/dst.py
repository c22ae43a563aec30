"""Dynamic sparse training (RigL, SET, static) as an optax wrapper.

The wrapper owns the masks: they live in its state, next to a step counter,
a PRNG key, the ITOP union mask and the inner optimizer's state, so a whole
sparse step is one ``tx.update`` plus ``optax.apply_updates`` under one
``jax.jit``. Topology changes run in a loop body that the step counter
runs once at mask updates and skips otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseopt_jax._src import structure as structure_lib
from sparseopt_jax._src import transform
from sparseopt_jax._src import tree as tree_lib
from sparseopt_jax._src.tree import PyTree

METHODS = ("rigl", "set", "static")
DROP_SCHEDULES = ("cosine", "constant")
GROW_WITH = ("raw", "corrected")

DropSchedule = str | Callable[[jax.Array], jax.Array]


class DynamicSparseState(NamedTuple):
  """State of :func:`dynamic_sparse`.

  Attributes:
    count: int32 number of updates taken.
    key: PRNG key, split at each mask update (SET's random growth).
    masks: the live mask tree (``bool`` arrays, ``None`` for dense leaves).
    ever_active: union of every mask so far, for the ITOP rate.
    num_changed: int32 scalar per sparse leaf: connections regrown (equal to
      connections dropped) at the last mask update.
    masks_updated: bool scalar, ``True`` iff the update that produced this
      state was a mask-update step (see :func:`masks_updated`); ``False``
      in the state from ``init``.
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  key: jax.Array
  masks: PyTree
  ever_active: PyTree
  num_changed: PyTree
  masks_updated: jax.Array
  inner_state: optax.OptState


def drop_fraction_schedule(
    drop_fraction: float, end_step: int, schedule: DropSchedule = "cosine"
) -> Callable[[jax.Array], jax.Array]:
  r"""The fraction of a layer's active weights replaced at step ``t``.

  ``"cosine"``: :math:`\frac{f}{2}\left(1 + \cos\frac{\pi t}{T_{end}}\right)`
  (RigL's default); ``"constant"``: :math:`f`. A callable ``t -> fraction``
  is returned as it is.

  Args:
    drop_fraction: the initial fraction :math:`f` in ``[0, 1]``.
    end_step: :math:`T_{end}`, the step after which masks stop changing.
    schedule: ``"cosine"``, ``"constant"`` or a callable.

  Returns:
    A function of the int32 step returning a float32 fraction.
  """
  if callable(schedule):
    return schedule
  if schedule not in DROP_SCHEDULES:
    raise ValueError(
        f"Unknown drop_schedule {schedule!r}; expected one of "
        f"{DROP_SCHEDULES} or a callable."
    )
  if schedule == "constant":
    return lambda t: jnp.float32(drop_fraction)

  def cosine(t):
    progress = jnp.minimum(t.astype(jnp.float32) / max(end_step, 1), 1.0)
    return 0.5 * drop_fraction * (1.0 + jnp.cos(jnp.pi * progress))

  return cosine


def finite_magnitude(x: jax.Array) -> jax.Array:
  # A non-finite value scores -1, below every finite magnitude: a NaN or inf
  # weight is the first to be dropped and a NaN or inf gradient the last to
  # grow a connection, so garbage never outranks a real measurement.
  x = x.astype(jnp.float32)
  return jnp.where(jnp.isfinite(x), jnp.abs(x), -1.0)


def first_k_of_top(scores: jax.Array, k_max: int, k: jax.Array) -> jax.Array:
  """Bool vector marking the ``k`` largest scores (``k <= k_max`` traced).

  ``lax.top_k`` returns equal scores lower index first, so ties go to the
  lower flat index. Its cost grows with the static ``k_max`` (on CPU about
  0.75 us per selected entry on top of a pass over the scores), which is
  what :func:`select_top_k` avoids for large layers.
  """
  _, idx = jax.lax.top_k(scores, k_max)
  return jnp.zeros(scores.shape, bool).at[idx].set(jnp.arange(k_max) < k)


# select_top_k's parameters. Below SELECT_MIN_SIZE scores plain top_k runs:
# each counting pass below is a loop iteration with a fixed cost, which only
# a large layer amortizes (benchmarks/selection.py). A strided sample of
# 1/SAMPLE_STRIDE of the scores brackets the k-th largest within
# SAMPLE_SIGMAS binomial standard deviations; INTERPOLATION_STEPS steps of
# interpolation search then narrow the bracket before it is split in thirds.
SAMPLE_STRIDE = 32
SAMPLE_SIGMAS = 4.0
INTERPOLATION_STEPS = 12
SELECT_MIN_SIZE = 1 << 15


def order_key(scores: jax.Array) -> jax.Array:
  """uint32 keys in the order of the float32 ``scores`` (without NaN).

  The float's bits, with the sign bit set for a non-negative value and all
  bits flipped for a negative one: comparing keys as unsigned integers
  compares the scores, ``-inf`` lowest and ``+inf`` highest. ``-0.0`` is
  made ``0.0`` first, so the two zeros tie, as they compare equal
  (``lax.top_k`` ranks ``-0.0`` below ``0.0``).
  """
  bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
  # Not `scores + 0.0`: XLA simplifies that to `scores`.
  bits = jnp.where(bits == jnp.uint32(1 << 31), jnp.uint32(0), bits)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def count_pair(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """int32 numbers of true entries of two bool arrays, in one pass.

  One variadic reduction, so XLA fuses both predicates into the loop that
  sums them and stores nothing. A plain ``jnp.sum`` of one predicate does
  not fuse on XLA's CPU backend: it first writes the predicate out as a
  float32 or int32 array as large as the layer (a fresh temporary in every
  mask-update step), which costs several times the sum itself
  (benchmarks/results/). ``a`` and ``b`` must differ as expressions, or XLA
  folds the pair back into one sum. Exact below 2**31 entries.
  """
  out = jax.lax.reduce(
      (a.astype(jnp.int32), b.astype(jnp.int32)),
      (jnp.int32(0), jnp.int32(0)),
      lambda x, y: (x[0] + y[0], x[1] + y[1]),
      tuple(range(a.ndim)),
  )
  return out[0], out[1]


_TOP_KEY = np.uint32(0xFFFFFFFF)  # Above the key of every non-NaN score.


def _sample_bracket(
    scores: jax.Array, k_max: int, k: jax.Array, to_key: Callable
) -> tuple[jax.Array, jax.Array]:
  """A likely bracket ``(lo, hi)`` of the k-th largest key, from a sample.

  ``scores``: flat float32 scores (an expression: only every
  ``SAMPLE_STRIDE``-th is computed), ``to_key``: their keys, in their
  order. ``lo`` is the key at the sample's rank a few standard deviations
  past ``k``'s expected rank, ``hi`` just above the key a few before it
  (``0`` and ``0xFFFFFFFF`` where the sample runs out); :func:`_kth_key`
  checks the bracket and widens it if the sample got it wrong.
  """
  sample = scores[::SAMPLE_STRIDE]
  num_sample = sample.size
  rate = num_sample / scores.size
  rank_max = min(
      num_sample,
      math.ceil(k_max * rate + SAMPLE_SIGMAS * math.sqrt(k_max * rate) + 8) + 1,
  )
  # The sample's largest scores, descending; lax.top_k on float32 is far
  # faster on CPU than on integers, and the keys keep the order.
  top = to_key(jax.lax.top_k(sample, rank_max)[0])
  rank = k.astype(jnp.float32) * rate
  margin = SAMPLE_SIGMAS * jnp.sqrt(rank) + 8
  r_hi = jnp.floor(rank - margin).astype(jnp.int32)
  r_lo = jnp.ceil(rank + margin).astype(jnp.int32)
  lo = jnp.where(
      r_lo >= rank_max, jnp.uint32(0), top[jnp.clip(r_lo, 0, rank_max - 1)]
  )
  hi = jnp.where(r_hi < 0, _TOP_KEY, top[jnp.clip(r_hi, 0, rank_max - 1)] + 1)
  return lo, hi


def _kth_key(
    key: jax.Array,
    k: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    ceiling: jax.Array | np.uint32 = _TOP_KEY,
    ceiling_count: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
  """Where the ``k`` largest of the flat uint32 ``key`` end, by counting.

  Every step is one pass that counts the keys at or above two probes
  (:func:`count_pair`). ``lo`` and ``hi`` keep ``count(key >= lo) >=
  k > count(key >= hi)``. They start from a guess (:func:`_sample_bracket`),
  checked by the first pass; a wrong guess opens to ``0`` (every key counts)
  or to ``ceiling``, at or above which ``ceiling_count < k`` keys lie. Each
  step interpolates the counts linearly between the ends and probes where
  they predict ``k +- m`` for a margin ``m`` of 1/32 of the bracket's count,
  so an accurate prediction shrinks the bracket 16-fold and a poor one still
  cuts it at a probe; an end that stays put for two steps or more counts
  half as far from ``k`` per step (regula falsi's Illinois rule), so a count
  curve far from linear still shrinks the bracket fast, and after
  ``INTERPOLATION_STEPS`` steps the probes split it in thirds. The search
  stops once ``count(key >= lo) == k``, or when the bracket is one key
  wide.

  ``lo`` is then the k-th largest key. If more than ``k`` keys equal it
  (ties), a search over the flat index, in thirds as well (only then,
  ``log3(n)`` passes), finds how many of the tied entries the ``k`` take:
  the lowest-indexed ones, as ``lax.top_k`` would.

  XLA's CPU backend hoists the computation of ``key`` out of the loops and
  stores it, once per call, so callers pass an expression of their arrays.

  Returns:
    ``(kth, cut)``: the ``k`` largest are the keys above ``kth`` and those
    equal to it at flat indices below ``cut``.
  """
  n = key.size
  c_lo, c_hi = count_pair(key >= lo, key >= hi)
  # A bracket the sample got wrong opens to the whole key range.
  lo, c_lo = jnp.where(c_lo >= k, lo, 0), jnp.where(c_lo >= k, c_lo, n)
  hi, c_hi = (
      jnp.where(c_hi < k, hi, ceiling),
      jnp.where(c_hi < k, c_hi, ceiling_count),
  )

  def narrowing(s):
    lo, hi, c_lo, *_ = s
    return (c_lo != k) & (hi - lo > 1)

  def narrow(s):
    lo, hi, c_lo, c_hi, step, stuck_lo, stuck_hi = s
    width = hi - lo
    w = width.astype(jnp.float32)
    kf = k.astype(jnp.float32)
    top = kf + (c_lo - kf) * 0.5 ** jnp.maximum(stuck_lo - 1, 0)
    bottom = kf - (kf - c_hi) * 0.5 ** jnp.maximum(stuck_hi - 1, 0)
    m = jnp.maximum((c_lo - c_hi).astype(jnp.float32) / 32, 0.5)

    def offset_for(count):  # Where the line through the ends hits count.
      x = (top - count) / (top - bottom) * w
      return jnp.clip(x, 1.0, w - 1.0).astype(jnp.uint32)

    interpolating = step < INTERPOLATION_STEPS
    off_a = jnp.where(interpolating, offset_for(kf + 0.5 + m), width // 3)
    off_b = jnp.where(
        interpolating, offset_for(kf + 0.5 - m), width - width // 3
    )
    # Both strictly inside (lo, hi) and ordered; equal probes are harmless.
    off_a = jnp.clip(off_a, 1, width - 1)
    off_b = jnp.clip(off_b, off_a, width - 1)
    a, b = lo + off_a, lo + off_b
    c_a, c_b = count_pair(key >= a, key >= b)
    # Counts fall as keys rise: the new lo is the highest probe counting at
    # least k, the new hi the lowest counting fewer.
    new_lo = jnp.where(c_b >= k, b, jnp.where(c_a >= k, a, lo))
    c_lo = jnp.where(c_b >= k, c_b, jnp.where(c_a >= k, c_a, c_lo))
    new_hi = jnp.where(c_a < k, a, jnp.where(c_b < k, b, hi))
    c_hi = jnp.where(c_a < k, c_a, jnp.where(c_b < k, c_b, c_hi))
    stuck_lo = jnp.where(new_lo == lo, stuck_lo + 1, 0)
    stuck_hi = jnp.where(new_hi == hi, stuck_hi + 1, 0)
    return new_lo, new_hi, c_lo, c_hi, step + 1, stuck_lo, stuck_hi

  zero = jnp.zeros([], jnp.int32)
  lo, _, c_lo, c_hi, *_ = jax.lax.while_loop(
      narrowing, narrow, (lo, hi, c_lo, c_hi, zero, zero, zero)
  )

  # Ties at lo: the smallest cut with count(key == lo, index < cut) equal
  # to the number still needed. Invariant: count at a < need <= count at b.
  need = k - c_hi

  def split(s):
    a, b = s
    third = jnp.maximum((b - a) // 3, 1)
    p, q = a + third, jnp.maximum(b - third, a + third)
    index = jax.lax.iota(jnp.int32, n)
    # lo ^ 0, with a 0 XLA cannot fold: otherwise it hoists the loop-
    # invariant `key == lo` out of the loop and computes it on every update,
    # ties or not.
    tied = key == lo ^ jnp.minimum(a, 0).astype(jnp.uint32)
    c_p, c_q = count_pair(tied & (index < p), tied & (index < q))
    a = jnp.where(c_q < need, q, jnp.where(c_p < need, p, a))
    b = jnp.where(c_p >= need, p, jnp.where(c_q >= need, q, b))
    return a, b

  exact = c_lo == k
  _, cut = jax.lax.while_loop(
      lambda s: s[1] - s[0] > 1,
      split,
      (jnp.int32(0), jnp.where(exact, 0, n).astype(jnp.int32)),
  )
  return lo, jnp.where(exact, n, cut).astype(jnp.int32)


def _chosen(key: jax.Array, kth: jax.Array, cut: jax.Array) -> jax.Array:
  """Bool mask of the flat keys above ``kth`` and those at it below ``cut``."""
  index = jax.lax.iota(jnp.int32, key.size)
  return (key > kth) | ((key == kth) & (index < cut))


def select_top_k(scores: jax.Array, k_max: int, k: jax.Array) -> jax.Array:
  """Exactly :func:`first_k_of_top` (ties to the lower index), faster.

  ``lax.top_k`` orders the ``k_max`` winners, which a mask does not need,
  and on CPU that costs far more than reading the scores. For a large
  layer this finds the k-th largest score by counting instead (an
  interpolation search started from a strided sample's bracket, a few
  fused passes over the scores' :func:`order_key`: :func:`_kth_key`) and
  then marks everything above it, with ties at it going to the lower flat
  index, as ``lax.top_k`` does. It is exact for any scores; only the
  number of passes varies (ties at the k-th score add a search over the
  index).

  Args:
    scores: a 1-D float vector without NaN (``-inf`` marks an entry that
      must not be selected unless fewer than ``k`` others remain).
    k_max: static bound on ``k``.
    k: int32 scalar, ``0 <= k <= k_max``.

  Returns:
    A bool vector like ``scores`` with exactly ``k`` entries set.
  """
  n = scores.size
  if k_max == 0:
    return jnp.zeros([n], bool)
  if n < SELECT_MIN_SIZE:
    return first_k_of_top(scores, k_max, k)
  key = order_key(scores)
  lo, hi = _sample_bracket(scores, k_max, k, order_key)
  return _chosen(key, *_kth_key(key, k, lo, hi)) & (k > 0)


class Shard(NamedTuple):
  """How :func:`select_top_k_sharded` splits a layer into pieces.

  Attributes:
    axis: the split axis.
    shards: the number of pieces; divides the layer's size along ``axis``.
    view: sharding of the ``(shards, piece)`` view (rows over the devices
      that hold the pieces), or ``None`` to leave the layout to the compiler.
  """

  axis: int
  shards: int
  view: jax.sharding.NamedSharding | None = None


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """int32 array of ``shape`` holding each entry's C-order flat index.

  Built from one iota per axis rather than ``iota(size).reshape(shape)``,
  so that under a sharded layout every device computes only its own piece.
  """
  index = jnp.zeros(shape, jnp.int32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index += jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
    stride *= shape[axis]
  return index


def shard_chunks(x: jax.Array, axis: int, shards: int) -> jax.Array:
  """``x`` as ``(shards, size // shards)``: one row per shard along ``axis``.

  Row ``s`` holds the entries whose index along ``axis`` lies in
  ``[s * c, (s + 1) * c)`` with ``c = x.shape[axis] // shards`` (the piece
  of ``x`` that shard ``s`` holds when ``axis`` is split over ``shards``
  devices), in that piece's own C order, which is the order of their flat
  indices in ``x``. Only the split axis moves, so a sharded ``x`` becomes a
  row-sharded view without any device sending its piece elsewhere.
  """
  shape = x.shape
  c = shape[axis] // shards
  x = x.reshape(shape[:axis] + (shards, c) + shape[axis + 1 :])
  return jnp.moveaxis(x, axis, 0).reshape(shards, -1)


def select_top_k_sharded(
    scores: jax.Array,
    k_max: int,
    k: jax.Array,
    axis: int,
    shards: int,
    view: jax.sharding.NamedSharding | None = None,
) -> jax.Array:
  """Exactly :func:`first_k_of_top` of the flat scores, selected per shard.

  ``lax.top_k`` over a layer's flat scores puts the whole vector on every
  device when the layer is sharded. Here each of the ``shards`` pieces along
  ``axis`` (:func:`shard_chunks`) keeps its own best ``min(k_max, piece)``
  candidates with a batched ``lax.top_k`` (equal scores lower index first),
  only those ``shards * k_max`` candidates and their flat indices meet, and
  their k-th best under "larger score first, then lower flat index" becomes
  a threshold that every device applies to its own piece. Every global
  winner is among its piece's candidates (fewer than ``k`` entries of the
  piece rank above it), so the result equals ``first_k_of_top`` on
  ``scores.reshape(-1)``, reshaped, for every ``axis``. When the pieces are
  contiguous in flat order (nothing but size-1 axes before ``axis``) the
  candidates are in flat order among equal scores and one ``lax.top_k``
  over them finds the k-th; otherwise a two-key ``lax.sort`` (score, then
  flat index) does. The threshold is then applied in ``scores``' shape, with
  no flat reshape of the layer.

  Args:
    scores: a float array without NaN or ``-0.0`` (``-inf`` marks an entry
      that must not be selected unless fewer than ``k`` others remain).
    k_max: static bound on ``k``, at most ``scores.size``.
    k: int32 scalar, ``0 <= k <= k_max``.
    axis: the axis split into pieces (normalized, ``0 <= axis < ndim``).
    shards: number of pieces; divides ``scores.shape[axis]``.
    view: if given, the sharding of the ``(shards, piece)`` view, rows
      over the devices holding the pieces: each device then ranks its own
      piece (``jax.shard_map``). Without it the compiler places the ranking,
      and XLA's partitioner gathers a sharded ``top_k``'s operand.

  Returns:
    A bool array like ``scores`` with exactly ``k`` entries set.
  """
  shape = scores.shape
  if k_max == 0:
    return jnp.zeros(shape, bool)
  size = math.prod(shape)
  piece = size // shards
  # Flat index of (shard s, position p in its piece): the piece's C order
  # is (index before axis, index within the piece's axis span, after).
  span = shape[axis] // shards * math.prod(shape[axis + 1 :])
  k_piece = min(k_max, piece)
  pieces = shard_chunks(scores, axis, shards)
  if view is None:
    values, pos = jax.lax.top_k(pieces, k_piece)
  else:
    # The partitioner replicates a top_k (or sort) whose batch axis is
    # sharded; shard_map keeps each row's ranking on the device holding it.
    values, pos = jax.shard_map(
        lambda x: tuple(jax.lax.top_k(x, k_piece)),
        mesh=view.mesh,
        in_specs=view.spec,
        out_specs=(view.spec, view.spec),
    )(pieces)
  shard = jnp.arange(shards, dtype=jnp.int32)[:, None]
  flat = (pos // span) * (span * shards) + shard * span + pos % span
  values, flat = values.reshape(-1), flat.reshape(-1)
  last = jnp.clip(k - 1, 0, k_max - 1)
  if math.prod(shape[:axis]) == 1:
    # Pieces in flat order: candidate order is flat order among ties.
    _, best = jax.lax.top_k(values, k_max)
    value, index = values[best[last]], flat[best[last]]
  else:
    neg, index = jax.lax.sort((-values, flat), num_keys=2)
    value, index = -neg[last], index[last]
  chosen = (scores > value) | (
      (scores == value) & (_flat_index(shape) <= index)
  )
  return chosen & (k > 0)


_SCORE_BITS_BASE = np.uint32(0x20000000)  # float32 2**-63.


def random_scores(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Random positive float32 scores, one per entry, for SET's growth.

  ``jax.random.uniform`` costs about 13 ns per entry on a CPU core (the
  threefry rounds), more than a RigL update spends per entry in total. SET
  only needs an exchangeable ranking of the inactive entries, so the key
  (through ``jax.random.bits``) seeds a counter-based hash instead: each
  entry's flat index, spread by a Weyl step and mixed with the two seed
  words, goes through the murmur3 finalizer, a bijection of the index for
  a given key. Its top 29 bits become the bits of a normal float32, so
  scores rank exactly as the hashes do; their values are not uniform, only
  their order is. Equal scores (one pair in about 2**29 / size entries)
  go to the lower index like every other tie; with fewer bits, ties at the
  k-th score were common enough to cost a mask update a tie search in
  about one large layer in seven.
  """
  return _seeded_scores(jax.random.bits(key, (2,), jnp.uint32), shape)


def _seeded_scores(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """:func:`random_scores` from its two seed words (see :func:`_hash_scores`)."""
  size = math.prod(shape)
  return _hash_scores(seed, jax.lax.iota(jnp.uint32, size)).reshape(shape)


def _hash_scores(seed: jax.Array, index: jax.Array) -> jax.Array:
  """:func:`random_scores` of the entries with these flat indices.

  ``seed``: two uint32 words (``jax.random.bits(key, (2,), jnp.uint32)``).
  """
  x = index.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + seed[0]

  def fmix(x):
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)

  x = fmix(x ^ seed[1])
  # The top 29 bits as the bits of a normal positive float32 (exponents
  # 2**-63 to 2**1): distinct hashes give distinct scores in the same order.
  return jax.lax.bitcast_convert_type((x >> 3) + _SCORE_BITS_BASE, jnp.float32)


# Keys of a layer's mask update (_update_by_counting): active entries below
# _GROWN_KEYS, ranked for dropping; inactive ones from it up, for growth.
_GROWN_KEYS = np.uint32(1 << 31)


def _drop_key(score: jax.Array) -> jax.Array:
  """Keys below ``_GROWN_KEYS`` in the order of drop scores.

  ``score``: ``-finite_magnitude(w)`` (``+1`` for a non-finite weight, else
  ``-|w|``), or ``-inf`` for an entry that is not active (key 0).
  """
  magnitude = jax.lax.bitcast_convert_type(jnp.abs(score), jnp.uint32)
  return jnp.where(
      score > 0,
      _GROWN_KEYS - 1,
      jnp.where(score == -jnp.inf, 0, _GROWN_KEYS - 2 - magnitude),
  ).astype(jnp.uint32)


def _grow_key(score: jax.Array) -> jax.Array:
  """Keys from ``_GROWN_KEYS`` up in the order of growth scores.

  ``score``: ``-inf`` for an entry that cannot grow, ``-1`` for one whose
  score is not finite (:func:`finite_magnitude`), else non-negative.
  """
  magnitude = jax.lax.bitcast_convert_type(jnp.abs(score), jnp.uint32)
  return jnp.where(
      score >= 0,
      _GROWN_KEYS + 2 + magnitude,
      jnp.where(score == -jnp.inf, _GROWN_KEYS, _GROWN_KEYS + 1),
  ).astype(jnp.uint32)


def _update_by_counting(
    m: jax.Array,
    drop_score: Callable[[], jax.Array],
    grow_score: Callable[[], jax.Array],
    active: jax.Array,
    k_max: int,
    k: jax.Array,
) -> jax.Array:
  """The flat mask after RigL's two selections, found by counting.

  Both selections rank one array of uint32 keys, one per entry: an active
  entry's drop score below ``_GROWN_KEYS`` (:func:`_drop_key`), an inactive
  entry's growth score at or above it (:func:`_grow_key`), each in its
  score's order. The ``k`` entries grown are then the ``k`` largest keys,
  and the ``k`` dropped the active ones among the ``n - active + k``
  largest: two plain top-k searches (:func:`_kth_key`) whose passes read
  only the keys (4 bytes per entry), with no mask to restrict them to.
  Ties go to the lower flat index in both rankings, as in
  :func:`first_k_of_top`.
  """
  n = m.size
  lo_d, hi_d = _sample_bracket(drop_score(), k_max, k, _drop_key)
  lo_g, hi_g = _sample_bracket(grow_score(), k_max, k, _grow_key)
  key = jnp.where(m, _drop_key(drop_score()), _grow_key(grow_score()))
  inactive = n - active
  # Every inactive key ranks above every active one, so the k active keys
  # to drop are the last of the n - active + k largest.
  # (Inactive entries pass the drop threshold too; the mask ignores them.)
  dropped = _chosen(
      key,
      *_kth_key(
          key,
          inactive + k,
          lo_d,
          jnp.minimum(hi_d, _GROWN_KEYS),
          _GROWN_KEYS,
          inactive,
      ),
  )
  grown = _chosen(key, *_kth_key(key, k, lo_g, hi_g))
  return jnp.where(k > 0, (m & ~dropped) | grown, m)


def _update_layer(
    mask: jax.Array,
    weight: jax.Array,
    grow_score: jax.Array,
    fraction: jax.Array,
    k_max: int,
    shard: Shard | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Drops the k smallest |w| among active entries, grows the k best inactive.

  ``k = floor(fraction * active)``, capped by the number of inactive entries
  that can grow (and by ``k_max``, the static bound of the schedule) so every
  layer keeps exactly its active count. Entries dropped now are not
  candidates for growth, and neither are inactive entries holding a
  non-finite weight: the additive update that starts a grown weight at
  ``p + (-p) = 0`` cannot do so from NaN or inf. Non-finite active weights
  are dropped first. Ties go to the lower flat index in both rankings.
  ``grow_score``: non-negative, or ``-1`` where not finite
  (:func:`finite_magnitude`).

  A layer of ``SELECT_MIN_SIZE`` entries or more selects by counting
  (:func:`_update_by_counting`), a smaller one with ``lax.top_k``. A
  :class:`Shard` selects per piece of the layer (:func:`select_top_k_sharded`)
  in the layer's own shape; the masks are the same in every case.

  Returns:
    The new mask and the int32 number of connections regrown.
  """
  if k_max == 0:
    return mask, jnp.zeros([], jnp.int32)
  if shard is None:
    m = mask.reshape(-1)
    w = weight.reshape(-1)
    grow_score = grow_score.reshape(-1)
  else:
    m, w = mask, weight
  can_grow = ~m & jnp.isfinite(w)
  active, growable = count_pair(m, can_grow)
  k = jnp.floor(fraction * active.astype(jnp.float32)).astype(jnp.int32)
  k = jnp.clip(k, 0, jnp.minimum(growable, k_max))

  # Scores as functions of the mask, weights and gradients: each use derives
  # them, and no score array is stored.
  def drop_score():
    # Smallest magnitudes first (every zero weight scores -0.0: they tie).
    return jnp.where(m, -finite_magnitude(w), -jnp.inf)

  def grow_score_fn():
    return jnp.where(can_grow, grow_score, -jnp.inf)

  if shard is None and m.size >= SELECT_MIN_SIZE:
    new = _update_by_counting(m, drop_score, grow_score_fn, active, k_max, k)
    return new.reshape(mask.shape), k
  # k <= active and k <= growable, so neither selection reaches -inf.
  if shard is None:
    dropped = first_k_of_top(drop_score(), k_max, k)
    grown = first_k_of_top(grow_score_fn(), k_max, k)
  else:
    dropped = select_top_k_sharded(drop_score(), k_max, k, *shard)
    grown = select_top_k_sharded(grow_score_fn(), k_max, k, *shard)
  # Scoring by the old mask excludes what was just dropped from growth.
  new = (m & ~dropped) | grown
  return new.reshape(mask.shape), k


def _update_groups(
    mask: jax.Array,
    weight: jax.Array,
    grow_score: jax.Array,
    fraction: jax.Array,
    k_max: int,
    structure: structure_lib.Structure,
    axis: tree_lib.NeuronAxis,
) -> tuple[jax.Array, jax.Array]:
  """:func:`_update_layer` within each group of a structured mask.

  Each neuron (``"constant_fan_in"``) or group of ``m`` inputs (N:M) drops
  its ``k = floor(fraction * active_in_group)`` smallest active weights and
  grows as many of its own inactive entries, so every group keeps its count.
  ``k_max`` bounds ``k`` per group.

  Returns:
    The new mask and the int32 number of connections regrown in the layer.
  """

  def view(x):
    return structure_lib.to_groups(x, structure, axis)

  new, k = jax.vmap(lambda m, w, s: _update_layer(m, w, s, fraction, k_max))(
      view(mask), view(weight), view(grow_score)
  )
  new = structure_lib.from_groups(new, mask.shape, structure, axis)
  return new, jnp.sum(k, dtype=jnp.int32)


def _max_group_changes(
    mask: Any,
    max_fraction: float,
    structure: Any,
    axis: tree_lib.NeuronAxis,
    name: str,
) -> int:
  """Static bound on connections one update can replace in one group."""
  shape = tuple(int(d) for d in np.shape(mask))
  _, size = structure_lib.group_shape(shape, structure, axis, name)
  counts = structure_lib.group_counts(mask, structure, axis, name)
  if counts is None or counts.size == 0:
    return size
  active = int(counts.max())
  return max(0, min(int(math.floor(max_fraction * active)), size - active))


def _max_changes(mask: Any, max_fraction: float) -> int:
  """Static bound on connections one update can replace in a layer."""
  n = int(np.size(mask))
  try:
    active = int(np.sum(np.asarray(mask)))
  except (
      jax.errors.ConcretizationTypeError,
      jax.errors.TracerArrayConversionError,
  ):
    return n  # Masks given as tracers: fall back to the loosest bound.
  return max(0, min(int(math.floor(max_fraction * active)), n - active))


def _is_pair(x: Any) -> bool:
  return x is None or isinstance(x, Shard)


def _leaf_shard(path: str, mask: Any, spec: Any) -> Shard | None:
  """One sparse leaf's pieces under ``dynamic_sparse(shardings=)``.

  ``None`` when the leaf is not split (or split into one piece).
  """
  shape = tuple(int(d) for d in np.shape(mask))
  where = f"shardings[{path!r}]"
  if spec is None:
    return None
  if not isinstance(spec, jax.sharding.NamedSharding):
    raise TypeError(
        f"{where} must be None or a jax.sharding.NamedSharding; got {spec!r}."
    )
  entries = tuple(spec.spec)
  if len(entries) > len(shape):
    raise ValueError(
        f"{where}: partition spec {spec.spec} has more entries than the "
        f"leaf has axes (shape {shape})."
    )
  counts = []
  for e in entries + (None,) * (len(shape) - len(entries)):
    names = () if e is None else (e,) if isinstance(e, str) else tuple(e)
    counts.append(math.prod(spec.mesh.shape[n] for n in names))
  if not counts or max(counts) == 1:
    return None
  # Several split axes: pieces along the most split one (still exact).
  axis = int(np.argmax(counts))
  shards = counts[axis]
  if shape[axis] % shards:
    raise ValueError(
        f"{where}: axis {axis} of size {shape[axis]} (shape {shape}) does not "
        f"split into {shards} equal pieces."
    )
  view = jax.sharding.NamedSharding(
      spec.mesh, jax.sharding.PartitionSpec(entries[axis], None)
  )
  return Shard(axis, shards, view)


def _resolve_shardings(shardings: Any, masks: PyTree) -> PyTree:
  """Per sparse leaf a :class:`Shard` or ``None``, aligned with ``masks``."""
  treedef = jax.tree.structure(masks, is_leaf=tree_lib.is_none)
  if shardings is None:
    return jax.tree.unflatten(treedef, [None] * treedef.num_leaves)
  specs = tree_lib.leaves_like(
      shardings,
      masks,
      "shardings must have the structure of the params (a NamedSharding "
      "or None at each leaf)",
  )
  leaves = jax.tree_util.tree_leaves_with_path(masks, is_leaf=tree_lib.is_none)
  return jax.tree.unflatten(
      treedef,
      [
          None if m is None else _leaf_shard(tree_lib.path_str(p), m, spec)
          for (p, m), spec in zip(leaves, specs, strict=True)
      ],
  )


def _params_like(params: PyTree) -> Callable[[Any], bool]:
  """Predicate: is a subtree shaped exactly like ``params``?"""
  treedef = jax.tree.structure(params)
  shapes = [np.shape(p) for p in jax.tree.leaves(params)]

  def pred(x: Any) -> bool:
    if jax.tree.structure(x) != treedef:
      return False
    return [np.shape(v) for v in jax.tree.leaves(x)] == shapes

  return pred


def reset_changed_moments(
    inner_state: optax.OptState, params: PyTree, changed: PyTree
) -> optax.OptState:
  """Zeroes every params-shaped subtree of an optimizer state where changed.

  Works for any optax optimizer without knowing its state classes: momentum
  (``sgd``), ``mu``/``nu`` (``adam``, ``adamw``, ``lion``...), accumulators of
  ``MultiSteps`` and friends are all subtrees with the params' structure and
  leaf shapes. Scalars such as counts are left alone.

  Args:
    inner_state: the optimizer state.
    params: the params (only structure and shapes are read).
    changed: a mask tree: ``True`` where a connection was dropped or grown,
      ``None`` for dense leaves.

  Returns:
    The state with changed positions of every moment set to zero.
  """
  is_params_like = _params_like(params)
  flat_changed = jax.tree.leaves(changed, is_leaf=tree_lib.is_none)
  treedef = jax.tree.structure(params)

  def reset(x):
    if not is_params_like(x):
      return x
    leaves = [
        v if c is None else jnp.where(c, jnp.zeros_like(v), v)
        for v, c in zip(jax.tree.leaves(x), flat_changed)
    ]
    return jax.tree.unflatten(treedef, leaves)

  return jax.tree.map(reset, inner_state, is_leaf=is_params_like)


def _check_key(key: Any) -> jax.Array:
  if isinstance(key, jax.Array) and jnp.issubdtype(
      key.dtype, jax.dtypes.prng_key
  ):
    return key
  if (
      isinstance(key, (jax.Array, np.ndarray))
      and key.dtype == np.uint32
      and key.shape == (2,)
  ):
    return jnp.asarray(key)
  raise TypeError(
      f"key must be a PRNG key (jax.random.key(seed)), got " f"{key!r}."
  )


def dynamic_sparse(
    inner: optax.GradientTransformation,
    masks: PyTree,
    *,
    method: str = "rigl",
    update_every: int = 100,
    end_step: int,
    drop_fraction: float = 0.3,
    drop_schedule: DropSchedule = "cosine",
    grow_with: str = "raw",
    key: jax.Array,
    neuron_axis: tree_lib.NeuronAxisSpec = -1,
    correction_filter: tree_lib.LeafFilter | None = None,
    structure: str | tuple[int, int] = "unstructured",
    shardings: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic sparse training around any optax optimizer: RigL, SET or static.

  Every step, gradients at inactive positions are zeroed, ``inner`` is
  updated with ``masks=<live masks>`` (so a :func:`scale_by_sparseopt` inside
  it sees the current topology) and ``masks_updated=<bool scalar>``, and the
  emitted updates keep every inactive weight exactly zero. The flag is
  ``True`` when the forwarded masks differ from those forwarded at the
  previous step, i.e. on the step after a mask update, and on the first
  step (count 0), where ``inner`` has not seen any masks yet; a transform
  that caches what it derives from the masks (as :func:`scale_by_sparseopt`
  does its factors) recomputes exactly then. A wrapper that skips calls to
  its inner transformation or drops their state (``optax.MultiSteps``,
  ``optax.apply_if_finite``) belongs outside ``dynamic_sparse``, not inside
  ``inner``, where it could swallow the flag.

  At steps :math:`t` with :math:`t \bmod \Delta T = 0` and
  :math:`0 < t < T_{end}`, each sparse layer replaces
  :math:`k = \lfloor f(t) \cdot n_{active} \rfloor` connections:

  * drop the :math:`k` active weights of smallest :math:`|w|`;
  * grow :math:`k` inactive connections not dropped in this update: RigL
    takes the largest :math:`|g|` (the raw gradient, or the SparseOpt-
    corrected one with ``grow_with="corrected"``), SET takes them uniformly
    at random; ``"static"`` never changes the masks.

  Ties go to the lower flat index, so per-layer active counts stay exactly
  constant.

  With ``structure="constant_fan_in"`` (SRigL) or ``structure=(n, m)``
  (N:M), drop and grow run within each neuron, or each group of ``m``
  consecutive inputs of a neuron (along its fan-in flattened in C order,
  ``H*W*Cin`` for a Conv, so along ``Cin``), with
  :math:`k = \lfloor f(t) \cdot n_{active\_in\_group} \rfloor` per group
  (so small groups may swap nothing at small :math:`f`): every neuron keeps
  its number of active inputs, every group its ``n``, and SparseOpt's factor
  is 1 throughout (``s_i == s_avg``). ``masks`` must have the structure
  already (build them with ``init_masks(..., structure=...)``); a
  ``ValueError`` names a leaf that does not, or whose fan-in is not a
  multiple of ``m``.

  The updates of a mask-update step set dropped weights to 0 and
  leave grown weights at 0, and every params-shaped moment of the inner state
  (momentum, Adam's ``mu``/``nu``...) is zeroed at changed positions. The
  choice runs on device, gated by the counter: no host sync, no retrace,
  and a normal step is the same single elementwise pass as a static mask's
  (the gated part is a ``lax.while_loop`` that runs once or not at all,
  which, unlike ``lax.cond``, leaves the state in place when skipped).

  Pruned weights: gradients outside the live mask are zeroed before
  ``inner`` sees them, and the updates there are ``-params`` at the first
  step (count 0) and at the weights a mask update drops, and 0 otherwise: a
  normal step does not read the params. So, whatever the gradients hold,
  after ``optax.apply_updates`` every pruned weight that was finite is
  exactly 0 and stays so, and a regrown connection starts at exactly 0 (an
  inactive position holding a non-finite weight is never regrown). A caller
  who writes the params between steps (anything but ``apply_updates``)
  re-applies the masks (:func:`apply_masks`).

  Non-finite values: non-finite weights and gradients rank below every
  finite magnitude: NaN and inf weights are dropped first, NaN and inf
  gradients grow last, and the per-layer counts stay exact. What no optax
  update can do is turn a NaN or inf weight into 0 (``NaN + x`` is NaN), so
  once a pruned or dropped weight is non-finite it stays so. A caller whose
  params may become non-finite (a diverging run) re-applies the live masks
  after each step, which is a ``jnp.where`` and does zero them:
  ``params = apply_masks(optax.apply_updates(params, updates),
  get_masks(state))``.

  Args:
    inner: any optax transformation, e.g.
      ``optax.chain(scale_by_sparseopt(), add_decayed_weights(wd), sgd(...))``.
    masks: the initial mask tree (see :func:`init_masks`). Params must be
      masked to match (:func:`apply_masks`); otherwise the first update zeroes
      them.
    method: ``"rigl"``, ``"set"`` or ``"static"``.
    update_every: :math:`\Delta T`, steps between mask updates (RigL: 100).
    end_step: :math:`T_{end}`, no mask update from this step on (RigL: 75% of
      training).
    drop_fraction: initial fraction of active weights replaced (RigL: 0.3).
    drop_schedule: ``"cosine"`` (RigL), ``"constant"``, or ``t -> fraction``.
    grow_with: RigL's growth score: ``"raw"`` gradient (default; the paper
      finds it explores better) or ``"corrected"`` (SparseOpt-scaled).
    key: PRNG key for SET's random growth.
    neuron_axis: output-unit axis, for ``grow_with="corrected"`` (whose
      factors are computed from the masks at the mask update itself) and
      structured masks: an int, a tuple of axes whose combination is the
      neuron (attention kernels), or a per-leaf pytree or callable, as in
      :func:`scale_by_sparseopt`.
    correction_filter: which masked leaves the ``"corrected"`` score scales
      (as ``filter_fn`` of :func:`scale_by_sparseopt`).
    structure: ``"unstructured"`` (default), ``"constant_fan_in"`` or
      ``(n, m)``; the neuron is ``neuron_axis``.
    shardings: how the params are laid out over devices, for mask updates
      of unstructured masks: ``None`` (default: each layer selects over its
      flat scores), or a pytree with the structure of the params whose
      leaves are ``None`` or a ``jax.sharding.NamedSharding`` (the params'
      own, e.g. the train step's ``in_shardings``; dense leaves are
      ignored). A sparse leaf split ``S`` ways along an axis (the most split
      one, if several are) selects its drops and growths per piece: each
      device ranks its own piece (``jax.shard_map`` over the sharding's
      mesh) and keeps its ``min(k_max, piece)`` best candidates, only those
      ``S`` sets of candidates and their flat indices are gathered, and the
      k-th best of them is a threshold each device applies to its own piece.
      A mask update then never gathers a layer's scores whole, nor views a
      layer split on a non-leading axis as a flat vector, as long as
      ``k_max`` (``drop_fraction`` times the layer's active count) is below
      a piece's size; from there on the candidates are the whole layer. The
      masks are exactly those chosen without ``shardings`` (same ties, same
      counts); only the work differs (a ``lax.top_k`` of ``k_max`` per
      piece, where the default counts its way to the k-th score from
      ``SELECT_MIN_SIZE`` entries, in passes that are reductions and
      gather nothing when the layer is split on its leading axis). Arrays
      are placed by the caller (``jax.jit``'s shardings); this only tells
      the mask update where they are. A
      ``ValueError`` names a leaf whose split axis does not divide evenly,
      and structured masks do not take ``shardings``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires
    ``params``; its state is a :class:`DynamicSparseState`
    (:func:`get_masks` and :func:`masks_updated` read it). Call ``update``
    inside ``jax.jit`` (as part of the train step): un-jitted, the
    mask update is traced again at every call.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sparseopt_jax as sparseopt
    >>> params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    >>> masks = sparseopt.init_masks(jax.random.key(1), params, 0.9, "uniform")
    >>> params = sparseopt.apply_masks(params, masks)
    >>> tx = sparseopt.dynamic_sparse(
    ...     optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.1, 0.9)),
    ...     masks, method="rigl", update_every=10, end_step=75,
    ...     key=jax.random.key(2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> int(sparseopt.get_masks(state)["w"].sum())
    13

  References:
    Evci et al. Rigging the Lottery: Making All Tickets Winners. ICML 2020.
    https://arxiv.org/abs/1911.11134

    Mocanu et al. Scalable training of artificial neural networks with
    adaptive sparse connectivity inspired by network science (SET). Nature
    Communications 2018. https://arxiv.org/abs/1707.04780

    Lasby et al. Dynamic Sparse Training with Structured Sparsity (SRigL).
    ICLR 2024. https://arxiv.org/abs/2305.02299
  """
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
  if grow_with not in GROW_WITH:
    raise ValueError(
        f"Unknown grow_with {grow_with!r}; expected one of " f"{GROW_WITH}."
    )
  for name, value in (("update_every", update_every), ("end_step", end_step)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise TypeError(f"{name} must be an int, got {value!r}.")
  if update_every < 1:
    raise ValueError(f"update_every must be >= 1, got {update_every}.")
  if end_step < 0:
    raise ValueError(f"end_step must be >= 0, got {end_step}.")
  if not callable(drop_schedule) and not (
      0.0 <= drop_fraction <= 1.0 and not math.isnan(drop_fraction)
  ):
    raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}.")
  key = _check_key(key)
  for path, m in tree_lib.mask_leaves_with_path(masks):
    dtype = getattr(m, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.bool_:
      raise TypeError(
          f"masks[{tree_lib.path_str(path)!r}] must be a boolean "
          f"array, got dtype {dtype}."
      )
  structure = structure_lib.check_structure(structure)
  tree_lib.check_neuron_axis_spec(neuron_axis)
  leaf_axes = tree_lib.resolve_neuron_axes(neuron_axis, masks)
  leaf_shards = _resolve_shardings(shardings, masks)
  if not structure_lib.is_unstructured(structure) and any(
      s is not None for s in jax.tree.leaves(leaf_shards, is_leaf=_is_pair)
  ):
    raise ValueError(
        "shardings selects per shard for unstructured masks only; structured "
        f"masks (structure={structure!r}) select within each group: pass "
        "shardings=None."
    )
  # The schedules we build never exceed drop_fraction; a callable might.
  max_fraction = 1.0 if callable(drop_schedule) else drop_fraction
  if structure_lib.is_unstructured(structure):
    k_max = jax.tree.map(lambda m: _max_changes(m, max_fraction), masks)
  else:

    def group_bound(path, m, ax):
      name = tree_lib.path_str(path)
      structure_lib.check_mask(m, structure, ax, name)
      return _max_group_changes(m, max_fraction, structure, ax, name)

    k_max = jax.tree_util.tree_map_with_path(group_bound, masks, leaf_axes)
  masks = jax.tree.map(jnp.asarray, masks)
  inner = optax.with_extra_args_support(inner)
  fraction_at = drop_fraction_schedule(drop_fraction, end_step, drop_schedule)

  def init_fn(params):
    # optax.tree.map_params calls init with a placeholder instead of arrays;
    # only real params can be checked against the masks.
    leaves = jax.tree.leaves(params)
    if leaves and all(hasattr(x, "shape") for x in leaves):
      tree_lib.validate_masks(params, masks)
    # Fresh buffers: a train step that donates its state must not delete the
    # arrays this closure (and the caller) hold, nor see one buffer twice.
    return DynamicSparseState(
        count=jnp.zeros([], jnp.int32),
        key=jnp.copy(key),
        masks=jax.tree.map(jnp.copy, masks),
        ever_active=jax.tree.map(jnp.copy, masks),
        num_changed=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), masks),
        masks_updated=jnp.zeros([], bool),
        inner_state=inner.init(params),
    )

  def grow_scores(grads, old_masks, params, step_key):
    if method == "set":
      leaves = tree_lib.mask_leaves_with_path(old_masks)
      index = {tree_lib.path_str(p): i for i, (p, _) in enumerate(leaves)}

      # One draw of seed words for all layers: a threefry call per layer
      # (fold_in, then bits) is a small loop each on CPU, and over a
      # ResNet-50's layers those loops cost more than hashing the scores.
      seeds = jax.random.bits(step_key, (max(len(leaves), 1), 2), jnp.uint32)

      def scores(path, m, shard):
        if m is None:
          return None
        seed = seeds[index[tree_lib.path_str(path)]]
        if shard is None:
          return _seeded_scores(seed, m.shape)
        # The same scores, hashed in the layer's shape (no flat iota).
        return _hash_scores(seed, _flat_index(m.shape))

      return tree_lib.map_masked(scores, old_masks, leaf_shards, with_path=True)
    if grow_with == "corrected":
      flags = transform.correction_flags(correction_filter, old_masks, params)
      # Counted here, inside the mask update: never on normal steps.
      scales = transform.scales_from_flags(
          old_masks, flags, None, neuron_axis, "fan_in"
      )
      grads = transform.apply_scales(grads, scales, neuron_axis=neuron_axis)
    return tree_lib.map_masked(
        lambda m, g: None if m is None else finite_magnitude(g),
        old_masks,
        grads,
    )

  def change_topology(count, old, params, grads, key):
    key, step_key = jax.random.split(key)
    fraction = fraction_at(count)
    scores = grow_scores(grads, old, params, step_key)

    def layer(m, w, s, kmax, ax, shard):
      if m is None:
        return None
      if structure_lib.is_unstructured(structure):
        return _update_layer(m, w, s, fraction, kmax, shard)
      return _update_groups(m, w, s, fraction, kmax, structure, ax)

    pairs = tree_lib.map_masked(
        layer, old, params, scores, k_max, leaf_axes, leaf_shards
    )
    new = tree_lib.map_masked(
        lambda m, p: None if m is None else p[0], old, pairs
    )
    num = tree_lib.map_masked(
        lambda m, p: None if m is None else p[1], old, pairs
    )
    return new, num, key

  def is_update_at(count):
    return (count > 0) & (count % update_every == 0) & (count < end_step)

  def update_fn(grads, state, params=None, **extra_args):
    return sparse_step(
        inner,
        grads,
        state,
        params,
        extra_args,
        who="dynamic_sparse",
        is_update_at=None if method == "static" else is_update_at,
        change_topology=change_topology,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class StepCarry(NamedTuple):
  """What a mask update may change in a step (see :func:`sparse_step`)."""

  pending: jax.Array
  masks: PyTree
  ever_active: PyTree
  num_changed: PyTree
  key: jax.Array
  updates: PyTree
  inner_state: optax.OptState


def sparse_step(
    inner: optax.GradientTransformationExtraArgs,
    grads: PyTree,
    state: DynamicSparseState,
    params: PyTree | None,
    extra_args: dict[str, Any],
    *,
    who: str,
    is_update_at: Callable[[jax.Array], jax.Array] | None,
    change_topology: Callable[..., tuple[PyTree, PyTree, jax.Array]],
) -> tuple[PyTree, DynamicSparseState]:
  """One step of a mask-owning wrapper (:func:`dynamic_sparse` and friends).

  Masks the gradients, updates ``inner`` with the live masks and sets the
  updates outside them to 0 (to ``-params`` at count 0, in a loop body that
  runs then only): one elementwise pass that does not read the params, all
  a normal step does. When ``is_update_at(count)`` holds, a loop body that
  runs once then calls ``change_topology(count, masks, params, grads, key)
  -> (masks, num_changed, key)``, resets moments where the masks changed and
  sets the updates there to ``-params``, so every position outside the
  old-and-new masks ends at zero. ``is_update_at=None``: the masks never
  change.
  """
  if params is None:
    raise ValueError(
        f"{who} needs params in update(grads, state, params): mask "
        f"updates rank weights by magnitude and the emitted updates zero "
        f"pruned weights."
    )
  # The live masks and whether they just changed are ours to forward.
  extra_args.pop("masks", None)
  extra_args.pop("masks_updated", None)
  old = state.masks
  tree_lib.validate_masks(grads, old, argname="DynamicSparseState.masks")
  # ``old`` differs from the masks forwarded last step iff that step was a
  # mask update; at count 0 nothing was forwarded yet.
  forwarded_new = state.masks_updated | (state.count == 0)
  inner_updates, inner_state = inner.update(
      tree_lib.zero_masked(old, grads),
      state.inner_state,
      params,
      masks=old,
      masks_updated=forwarded_new,
      **extra_args,
  )
  # Live connections take the inner update. Every other position holds a
  # weight that is already exactly 0 and gets an update of 0, so a normal
  # step never reads the params: on the first step (count 0) only, a loop
  # body sets those updates to -params, which zeroes whatever the caller's
  # params held there (p + (-p) == 0 for finite p); mask updates do the same
  # for the weights they drop. No additive update can zero a NaN or inf
  # weight: see "Non-finite values" in dynamic_sparse.
  updates = tree_lib.map_masked(
      lambda m, u: u if m is None else jnp.where(m, u, jnp.zeros_like(u)),
      old,
      inner_updates,
  )

  def zero_pruned(carry: tuple[jax.Array, PyTree]) -> tuple[jax.Array, PyTree]:
    return jnp.zeros([], bool), tree_lib.map_masked(
        lambda m, u, p: u if m is None else jnp.where(m, u, -p),
        old,
        carry[1],
        params,
    )

  # Runs once at count 0 and not at all otherwise (see the mask-update loop
  # below for why a loop and not a cond).
  _, updates = jax.lax.while_loop(
      lambda c: c[0], zero_pruned, (state.count == 0, updates)
  )
  result = StepCarry(
      pending=jnp.zeros([], bool),
      masks=old,
      ever_active=state.ever_active,
      num_changed=state.num_changed,
      key=state.key,
      updates=updates,
      inner_state=inner_state,
  )
  is_update = jnp.zeros([], bool)
  if is_update_at is not None:
    count = state.count
    is_update = is_update_at(count)

    def change(carry: StepCarry) -> StepCarry:
      new, num_changed, key = change_topology(
          count, carry.masks, params, grads, carry.key
      )
      changed = tree_lib.map_masked(
          lambda o, n: None if o is None else o ^ n, carry.masks, new
      )
      # Dropped and grown connections both start from zero: their moments
      # are reset and their update is -p (dropped weights go to zero, grown
      # ones stay there).
      return StepCarry(
          pending=jnp.zeros([], bool),
          masks=new,
          ever_active=tree_lib.map_masked(
              lambda e, n: None if e is None else e | n, carry.ever_active, new
          ),
          num_changed=num_changed,
          key=key,
          updates=tree_lib.map_masked(
              lambda c, u, p: u if c is None else jnp.where(c, -p, u),
              changed,
              carry.updates,
              params,
          ),
          inner_state=reset_changed_moments(carry.inner_state, params, changed),
      )

    # A loop that runs once on mask-update steps and not at all otherwise,
    # rather than a cond: a while loop's state stays in place when the body
    # does not run, where a cond copies every params-sized array it passes
    # through (benchmarks/results/). The normal step above never reads the
    # new masks, so it is the same elementwise pass as a static step.
    result = jax.lax.while_loop(
        lambda c: c.pending, change, result._replace(pending=is_update)
    )
  return result.updates, DynamicSparseState(
      count=optax.safe_int32_increment(state.count),
      key=result.key,
      masks=result.masks,
      ever_active=result.ever_active,
      num_changed=result.num_changed,
      masks_updated=is_update,
      inner_state=result.inner_state,
  )


def find_state(state: optax.OptState) -> DynamicSparseState:
  """The (single) :class:`DynamicSparseState` inside an optimizer state."""
  found = [
      s
      for s in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, DynamicSparseState)
      )
      if isinstance(s, DynamicSparseState)
  ]
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one DynamicSparseState in the "
        f"optimizer state, found {len(found)}. Is the optimizer "
        f"built with sparseopt.dynamic_sparse?"
    )
  return found[0]


def get_masks(state: optax.OptState) -> PyTree:
  """The live mask tree held by a :func:`dynamic_sparse` optimizer state.

  Args:
    state: a :class:`DynamicSparseState`, or any optimizer state containing
      exactly one (e.g. when the wrapper sits inside ``optax.chain``).

  Returns:
    The mask tree (works on concrete states and inside ``jax.jit``).
  """
  return find_state(state).masks


def masks_updated(state: optax.OptState) -> jax.Array:
  r"""Whether the update that produced ``state`` was a mask-update step.

  With ``state`` the result of the update at step :math:`t` (the update
  called with ``count == t``), this is :math:`t \bmod \Delta T = 0` and
  :math:`0 < t < T_{end}` for ``"rigl"`` and ``"set"`` (whether or not any
  connection actually moved), and always ``False`` for ``"static"`` and for
  the state returned by ``init``. The masks in ``state`` (:func:`get_masks`)
  are then the new ones; the updates emitted by that same call already
  zeroed the dropped weights. Use it to log what happens at mask updates
  without recomputing the schedule.

  Args:
    state: a :class:`DynamicSparseState`, or any optimizer state containing
      exactly one.

  Returns:
    A bool scalar (works on concrete states and inside ``jax.jit``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import sparseopt_jax as sparseopt
    >>> params = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> masks = sparseopt.init_masks(jax.random.key(1), params, 0.5, "uniform")
    >>> params = sparseopt.apply_masks(params, masks)
    >>> tx = sparseopt.dynamic_sparse(optax.sgd(0.1), masks, update_every=2,
    ...                               end_step=10, key=jax.random.key(2))
    >>> state, step = tx.init(params), jax.jit(tx.update)
    >>> flags = []
    >>> for _ in range(5):
    ...   _, state = step(params, state, params)
    ...   flags.append(bool(sparseopt.masks_updated(state)))
    >>> flags  # updates at steps 0..4; masks change at steps 2 and 4
    [False, False, True, False, True]

  References:
    Evci et al. Rigging the Lottery: Making All Tickets Winners. ICML 2020
    (the mask-update schedule). https://arxiv.org/abs/1911.11134
  """
  return find_state(state).masks_updated


def itop_rate(state: optax.OptState) -> jax.Array:
  r"""In-time over-parameterization rate: fraction of sparse weights ever active.

  .. math:: R = \frac{\sum_l \lVert \bigcup_t M_l^{(t)} \rVert_0}
                     {\sum_l |M_l|}

  over the sparse leaves (dense leaves are not counted). It starts at
  ``1 - sparsity`` and never decreases.

  Args:
    state: a :class:`DynamicSparseState` or a state containing one.

  Returns:
    A float32 scalar.

  References:
    Liu et al. Do We Actually Need Dense Over-Parameterization? In-Time
    Over-Parameterization in Sparse Training. ICML 2021.
    https://arxiv.org/abs/2102.02887
  """
  leaves = [
      m
      for _, m in tree_lib.mask_leaves_with_path(find_state(state).ever_active)
  ]
  total = sum(int(m.size) for m in leaves)
  if total == 0:
    return jnp.float32(0.0)
  ever = sum(tree_lib.count_true(m) for m in leaves)
  return ever / jnp.float32(total)
