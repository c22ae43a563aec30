"""One shared suite that every public transform passes (as optax's
``contrib/_common_test.py``): jit, finite outputs, shapes and dtypes kept
(bf16 too), no recompile, composition with ``chain``, ``MultiSteps``,
``inject_hyperparams``, ``optax.tree.map_params`` and ``lax.scan``, donated
states, and convergence on small targets wherever the base optimizer
converges.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt


def problem(dtype=jnp.float32):
  """Tiny masked params: a Conv, a Dense, a bias. Params respect the masks."""
  k = jax.random.split(jax.random.key(0), 4)
  params = {
      "conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4))},
      "dense": {
          "kernel": jax.random.normal(k[1], (4, 6)),
          "bias": jnp.zeros(6),
      },
  }
  masks = sparseopt.init_masks(k[2], params, 0.6, "uniform")
  masks["conv"]["kernel"] = masks["conv"]["kernel"].at[..., 0].set(False)
  params = sparseopt.apply_masks(params, masks)
  params = jax.tree.map(lambda x: x.astype(dtype), params)

  def grads_at(step):
    keys = jax.random.split(jax.random.fold_in(k[3], step), 3)
    return jax.tree.map(
        lambda x, kk: jax.random.normal(kk, x.shape, dtype),
        params,
        jax.tree.unflatten(jax.tree.structure(params), list(keys)),
    )

  return params, masks, grads_at


# name -> (factory(masks) -> tx, whether update takes masks= from the caller)
def _dst(method):
  def make(masks, inner=None):
    inner = inner or optax.chain(
        sparseopt.scale_by_sparseopt(), optax.sgd(0.05, momentum=0.9)
    )
    return sparseopt.dynamic_sparse(
        inner,
        masks,
        method=method,
        update_every=2,
        end_step=8,
        drop_fraction=0.5,
        key=jax.random.key(7),
    )

  return make


TRANSFORMS = {
    "scale_by_sparseopt": (lambda m: sparseopt.scale_by_sparseopt(), True),
    "scale_by_sparseopt_norm": (
        lambda m: sparseopt.scale_by_sparseopt(correction="norm"),
        True,
    ),
    "zero_masked_updates": (lambda m: sparseopt.zero_masked_updates(), True),
    "sparseopt": (lambda m: sparseopt.sparseopt(0.05, weight_decay=1e-3), True),
    "dst_rigl": (_dst("rigl"), False),
    "dst_set": (_dst("set"), False),
    "dst_static": (_dst("static"), False),
    # Masks start dense and are pruned at steps 0, 2 and 4.
    "gradual_pruning": (
        lambda m: sparseopt.gradual_pruning(
            optax.chain(
                sparseopt.scale_by_sparseopt(), optax.sgd(0.05, momentum=0.9)
            ),
            0.6,
            start_step=0,
            end_step=4,
            update_every=2,
        ),
        False,
    ),
    # HAM around SparseOpt + SGD; masks= reaches the inner chain.
    "ham": (
        lambda m: sparseopt.ham(
            optax.chain(
                sparseopt.scale_by_sparseopt(), optax.sgd(0.05, momentum=0.9)
            ),
            0.05,
            alpha=20.0,
            max_norm=1000.0,
        ),
        True,
    ),
    "normalize_updates_global": (lambda m: sparseopt.normalize_updates(), True),
    "normalize_updates_layer": (
        lambda m: sparseopt.normalize_updates("layer"),
        True,
    ),
}
NAMES = list(TRANSFORMS)


def make_tx(name, masks):
  factory, takes_masks = TRANSFORMS[name]
  return factory(masks), ({"masks": masks} if takes_masks else {})


def check_tree(updates, params):
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    assert u.shape == p.shape
    assert u.dtype == p.dtype, (u.dtype, p.dtype)
    assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_jit_finite_shapes_dtypes_no_recompile(name, dtype):
  params, masks, grads_at = problem(dtype)
  tx, kw = make_tx(name, masks)
  traces = []

  @jax.jit
  def step(params, state, grads, kw):
    traces.append(1)  # runs only while tracing
    updates, state = tx.update(grads, state, params, **kw)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  # 5 steps cover DST mask updates at steps 2 and 4 (update_every=2).
  for t in range(5):
    new_params, state, updates = step(params, state, grads_at(t), kw)
    check_tree(updates, params)
    check_tree(new_params, params)
    params = new_params
  assert len(traces) == 1, "retraced on a later call"
  if hasattr(step, "_cache_size"):  # private jax API, checked when present
    assert step._cache_size() == 1


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain_and_multisteps(name):
  params, masks, grads_at = problem()
  tx, kw = make_tx(name, masks)
  # chain forwards masks= to the transform; a trailing scale(1) is a no-op.
  chained = optax.chain(tx, optax.scale(1.0))
  s1, s2 = tx.init(params), chained.init(params)
  # Eager dynamic_sparse updates recompile their lax.cond on every call
  # (~1 s each), so every reference computation here is jitted too.
  direct = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
  u1, _ = direct(grads_at(0), s1, params, kw)
  u2, _ = jax.jit(lambda g, s, p, kw: chained.update(g, s, p, **kw))(
      grads_at(0), s2, params, kw
  )
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  # MultiSteps: zero updates on the accumulating call, then the inner update
  # of the mean gradient.
  multi = optax.MultiSteps(tx, every_k_schedule=2)
  ms = multi.init(params)
  step = jax.jit(lambda g, s, p, kw: multi.update(g, s, p, **kw))
  g0, g1 = grads_at(0), grads_at(1)
  u, ms = step(g0, ms, params, kw)
  for leaf in jax.tree.leaves(u):
    np.testing.assert_array_equal(leaf, 0.0)
  u, ms = step(g1, ms, params, kw)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g0, g1)
  want, _ = direct(mean, tx.init(params), params, kw)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_under_lax_scan(name):
  # A scanned training loop equals the same steps taken one by one.
  params, masks, grads_at = problem()
  tx, kw = make_tx(name, masks)
  grads = [grads_at(t) for t in range(5)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p, **kw)
    return (optax.apply_updates(p, u), s), None

  (p_scan, _), _ = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))(
      (params, tx.init(params)), stacked
  )
  p, s = params, tx.init(params)
  jbody = jax.jit(body)
  for g in grads:
    (p, s), _ = jbody((p, s), g)
  for a, b in zip(jax.tree.leaves(p_scan), jax.tree.leaves(p)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# inject_hyperparams applies the factory's defaults and turns every numeric
# argument into a traced hyperparameter; the alias must work both ways.
INJECT_STATIC = {
    "plain": (),
    "static": ("neuron_axis", "momentum", "weight_decay"),
}


@pytest.mark.parametrize("static", ["plain", "static"])
def test_alias_under_inject_hyperparams(static):
  params, masks, grads_at = problem()
  tx = optax.inject_hyperparams(
      sparseopt.sparseopt, static_args=INJECT_STATIC[static]
  )(learning_rate=0.1, momentum=None)
  plain = sparseopt.sparseopt(0.1, momentum=None)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, m: tx.update(g, s, p, masks=m))
  u, state = step(grads_at(0), state, params, masks)
  want, _ = plain.update(grads_at(0), plain.init(params), params, masks=masks)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # Changing the injected learning rate rescales the (momentum-free) update.
  state.hyperparams["learning_rate"] = jnp.asarray(0.025)
  u2, _ = step(grads_at(0), state, params, masks)
  for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, 0.25 * b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["rigl", "set", "static"])
def test_dst_around_inject_hyperparams(method):
  params, masks, grads_at = problem()
  inner = optax.inject_hyperparams(
      sparseopt.sparseopt, static_args=INJECT_STATIC["static"]
  )(learning_rate=0.1)
  tx = _dst(method)(masks, inner)
  step = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(3):
    u, state = step(grads_at(t), state, params)
    params = optax.apply_updates(params, u)
  check_tree(u, params)
  assert "learning_rate" in state.inner_state.hyperparams


@pytest.mark.parametrize(
    "opt",
    [
        functools.partial(optax.adam, 1e-2),
        functools.partial(optax.adamw, 1e-2, weight_decay=1e-2),
        functools.partial(optax.lion, 1e-3),
    ],
)
@pytest.mark.parametrize("method", [None, "rigl"])
def test_in_front_of_adaptive_optimizers(opt, method):
  params, masks, grads_at = problem()
  inner = optax.chain(sparseopt.scale_by_sparseopt(), opt())
  if method:
    tx, kw = _dst(method)(masks, inner), {}
  else:
    tx, kw = inner, {"masks": masks}
  state = tx.init(params)
  step = jax.jit(lambda g, s, p, kw: tx.update(g, s, p, **kw))
  for t in range(5):
    u, state = step(grads_at(t), state, params, kw)
    check_tree(u, params)
    params = optax.apply_updates(params, u)


def _sparse_states(state):
  return [
      s
      for s in jax.tree.leaves(
          state,
          is_leaf=lambda x: isinstance(x, sparseopt.ScaleBySparseOptState),
      )
      if isinstance(s, sparseopt.ScaleBySparseOptState)
  ]


@pytest.mark.parametrize("name", NAMES)
def test_tree_map_params(name):
  # optax.tree.map_params reaches the params-shaped parts of a state without
  # knowing its classes (e.g. to cast moments or shard them like params); it
  # calls init with a leafless placeholder to find them.
  params, masks, grads_at = problem()
  tx, kw = make_tx(name, masks)
  state = tx.init(params)
  cast = optax.tree.map_params(tx.init, lambda p: p.astype(jnp.bfloat16), state)
  assert jax.tree.structure(cast) == jax.tree.structure(state)
  shapes = {p.shape for p in jax.tree.leaves(params)}
  n_cast = 0
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(cast)):
    if b.dtype != a.dtype:
      assert a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
      assert a.shape in shapes  # only params-like leaves are reached
      n_cast += 1
  if name in ("sparseopt", "gradual_pruning") or name.startswith("dst"):
    assert n_cast > 0  # the momentum trace was reached
  # SparseOpt's cache of per-neuron factors is not params-like: left alone.
  for a in _sparse_states(cast):
    for leaf in jax.tree.leaves(a.scales):
      assert leaf.dtype == jnp.float32
  u, _ = tx.update(grads_at(0), cast, params, **kw)
  check_tree(u, params)


@pytest.mark.parametrize("name", NAMES)
def test_donated_state(name):
  # A train step that donates its optimizer state (the usual jit setup) must
  # give the same result as one that does not: no buffer shared between
  # state leaves, or with what the transform's closure holds.
  params, masks, grads_at = problem()
  tx, kw = make_tx(name, masks)

  def step(state, params, grads, kw):
    updates, state = tx.update(grads, state, params, **kw)
    return state, optax.apply_updates(params, updates)

  plain = jax.jit(step)
  donating = jax.jit(step, donate_argnums=0)
  s1, s2, p1, p2 = tx.init(params), tx.init(params), params, params
  for t in range(5):  # DST mask updates at steps 2 and 4
    s1, p1 = plain(s1, p1, grads_at(t), kw)
    s2, p2 = donating(s2, p2, grads_at(t), kw)

  def data(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    return x

  for a, b in zip(jax.tree.leaves((s1, p1)), jax.tree.leaves((s2, p2))):
    np.testing.assert_array_equal(data(a), data(b))
  # A fresh init after donating states still works (nothing it holds was
  # donated away).
  s3 = tx.init(params)
  donating(s3, params, grads_at(0), kw)


# ------------------------------------------------------------ convergence
#
# As optax's contrib suite: on small targets the wrapped optimizer must reach
# the optimum whenever the base optimizer does. Most targets start at zero,
# which is where masks inferred from ``params != 0`` used to freeze a layer.


def parabola():
  return (jnp.array([-1.0, 10.0, 1.0]), jnp.array([1.0, -1.0, 1.0]))


def rosenbrock():
  return jnp.zeros(2), jnp.array([1.0, 1.0])


def rosenbrock_loss(p):
  return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


def matrix_parabola():
  return jnp.zeros((2, 2)), jnp.array([[3.0, -2.0], [1.0, 4.0]])


def mixed_target():
  # A 1-D and a 2-D leaf; the zero entry of the 2-D target gets no gradient
  # from a zero start, so masks inferred from params prune it after step 1.
  return (
      (jnp.zeros(3), jnp.zeros((2, 2))),
      (jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])),
  )


def sparse_layer():
  # A kernel whose optimum has 8 zeros of 24, and its bias. DST masks keep
  # the support plus 4 slack connections: RigL and SET swap slack entries
  # (exactly zero, as is the target there) and never lose the support.
  rng = np.random.default_rng(0)
  support = np.zeros(24, bool)
  support[rng.choice(24, 8, replace=False)] = True
  kernel = np.where(support, rng.choice([-2.0, -1.0, 1.0, 2.0], 24), 0.0)
  return (
      {"kernel": jnp.zeros((4, 6)), "bias": jnp.zeros(6)},
      {
          "kernel": jnp.asarray(kernel.reshape(4, 6), jnp.float32),
          "bias": jnp.arange(6.0) - 2.5,
      },
  )


def sparse_layer_masks(final):
  support = np.asarray(final["kernel"]).reshape(-1) != 0
  slack = np.flatnonzero(~support)[:4]
  mask = support.copy()
  mask[slack] = True
  return {"kernel": jnp.asarray(mask.reshape(4, 6)), "bias": None}


def squared_distance(final):
  return lambda p: sum(
      jnp.sum((a - b) ** 2)
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(final))
  )


# name -> (init and optimum, loss, SGD learning rate, steps). The base
# optimizer is SGD with momentum 0.9 at that learning rate.
TARGETS = {
    "parabola": (parabola, None, 0.1, 200),
    "rosenbrock": (rosenbrock, rosenbrock_loss, 1e-3, 3000),
    "matrix_parabola": (matrix_parabola, None, 0.1, 200),
    "mixed": (mixed_target, None, 0.1, 200),
    "sparse_layer": (sparse_layer, None, 0.1, 300),
}


def dst_masks(final):
  """Masks for dynamic_sparse: dense kernels unless the target is sparse."""
  if isinstance(final, dict):
    return sparse_layer_masks(final)
  return jax.tree.map(
      lambda f: jnp.ones(f.shape, bool) if f.ndim >= 2 else None, final
  )


def optimizer(name, lr, final, steps=None):
  """The transform under test with (or as) SGD with momentum at ``lr``."""
  base = optax.sgd(lr, momentum=0.9)
  if name == "scale_by_sparseopt":
    return optax.chain(sparseopt.scale_by_sparseopt(), base)
  if name == "scale_by_sparseopt_norm":
    return optax.chain(sparseopt.scale_by_sparseopt(correction="norm"), base)
  if name == "zero_masked_updates":
    return optax.chain(base, sparseopt.zero_masked_updates())
  if name == "sparseopt":
    return sparseopt.sparseopt(lr, momentum=0.9)
  if name == "ham":
    # The mirror step's effective rate is lr * alpha * |w|: on these
    # unit-scale targets alpha = 1 (the paper's 200 suits tiny gradients).
    return sparseopt.ham(
        optax.chain(sparseopt.scale_by_sparseopt(), base), lr, alpha=1.0
    )
  if name.startswith("normalize_updates"):
    # Unit-norm steps converge only with a decaying step size.
    return optax.chain(
        sparseopt.normalize_updates(name.removeprefix("normalize_updates_")),
        optax.sgd(optax.cosine_decay_schedule(lr, steps or 300), momentum=0.9),
    )
  if name == "gradual_pruning":
    # Prunes the sparse target's kernel to its support plus slack after it
    # has nearly converged; dense targets keep every weight (sparsity 0).
    return sparseopt.gradual_pruning(
        optax.chain(sparseopt.scale_by_sparseopt(), base),
        0.5 if isinstance(final, dict) else 0.0,
        start_step=50,
        end_step=150,
        update_every=10,
        distribution="uniform",
    )
  return sparseopt.dynamic_sparse(
      optax.chain(sparseopt.scale_by_sparseopt(), base),
      dst_masks(final),
      method=name.removeprefix("dst_"),
      update_every=10,
      end_step=150,
      key=jax.random.key(3),
  )


def run_target(tx, init, loss, steps):
  @jax.jit
  def solve(params):
    def body(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(body, (params, tx.init(params)), length=steps)[0]

  return solve(init)


@pytest.mark.parametrize("target", list(TARGETS))
def test_base_optimizer_converges(target):
  setup, loss, lr, steps = TARGETS[target]
  init, final = setup()
  got, _ = run_target(
      optax.sgd(lr, momentum=0.9), init, loss or squared_distance(final), steps
  )
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(final)):
    np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", NAMES)
def test_converges_where_the_base_optimizer_does(name, target):
  setup, loss, lr, steps = TARGETS[target]
  init, final = setup()
  tx = optimizer(name, lr, final, steps)
  got, state = run_target(tx, init, loss or squared_distance(final), steps)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(final)):
    np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2)
  if target == "sparse_layer" and name in ("dst_rigl", "dst_set"):
    # The topology did change on the way (slack connections were swapped).
    density = float(jnp.mean(dst_masks(final)["kernel"]))
    assert float(sparseopt.itop_rate(state)) > density
