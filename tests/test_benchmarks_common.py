"""The benchmark harness's candidates run the steps they say they run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common


def test_donating_carries_state_and_takes_inputs_in_turn():
  # Position 0 is carried (and donated), position 1 is fed in turn.
  fn = lambda total, x: (total + x, x * 2)
  call, args = common.donating(
      fn,
      (jnp.zeros(3), jnp.full(3, 1.0)),
      carried=(0,),
      inputs=[(jnp.full(3, 10.0),), (jnp.full(3, 100.0),)],
  )
  seen = [float(call(*args)[1][0]) for _ in range(4)]
  assert seen == [2.0, 20.0, 200.0, 2.0]  # args' own first, then inputs
  np.testing.assert_array_equal(
      call(*args)[0], np.full(3, 1 + 10 + 100 + 1 + 10)
  )


def test_update_candidate_applied_carries_the_params():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  tx = optax.sgd(0.1, momentum=0.9)
  call, args = common.update_candidate(
      tx, tx.init(params), grads, params, apply=True
  )
  for _ in range(3):
    state, new_params = call(*args)
  # Momentum SGD by hand: trace_t = g + 0.9 trace_{t-1}, p -= 0.1 trace_t.
  trace, expected = 0.0, {k: np.asarray(v) for k, v in params.items()}
  for _ in range(3):
    trace = 0.5 + 0.9 * trace
    expected = {k: v - 0.1 * trace for k, v in expected.items()}
  for k in params:
    np.testing.assert_allclose(new_params[k], expected[k], rtol=1e-6)
  np.testing.assert_allclose(state[0].trace["w"], np.full((2, 3), trace))


def test_update_candidate_holds_the_count():
  # With count=, every call is the same kind of step: the counter is reset.
  params = {"w": jnp.ones((4, 8))}
  masks = {"w": jnp.arange(32).reshape(4, 8) % 2 == 0}
  tx = common.sparse_wrapper(masks)
  grads = common.random_grads(params)
  for apply in (False, True):
    call, args = common.update_candidate(
        tx, tx.init(params), grads, params, count=7, apply=apply
    )
    # Each call runs the step at count 7, so each returns a count of 8.
    counts = [int(call(*args)[0].count) for _ in range(3)]
    assert counts == [8, 8, 8], (apply, counts)
