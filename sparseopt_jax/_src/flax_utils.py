"""Pairs Flax kernels with the BatchNorm that normalizes their output.

Imports flax: reached only through ``import sparseopt_jax.flax_utils``, never
from the package's ``__init__``, so the core stays flax-free.

The pairing follows data flow, not names: every call of a module that owns
a ``kernel`` records its output array, and every BatchNorm call looks its
input up among those outputs by identity (linen: under
``nn.intercept_methods``; NNX, which has no interceptors: with the module
classes' ``__call__`` wrapped during one abstract trace of a copy). A BatchNorm paired that way normalizes the kernel's output directly,
which is exactly the case where BatchNorm skews the kernel's per-neuron
gradients; an output that reaches a BatchNorm only through another operation
(an activation, a reshape, a sum of two convolutions) is left unpaired.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp

from sparseopt_jax._src import tree as tree_lib
from sparseopt_jax._src.tree import PyTree


class _Recorder:
  """Trace-time bookkeeping of one forward pass (Python side, static)."""

  def __init__(self, capture: bool):
    self.capture = capture
    # id(output) -> (output, kernel path). The output is kept so that its id
    # is not reused by another array while the forward runs.
    self.outputs: dict[int, tuple[Any, str]] = {}
    self.pairs: dict[str, str] = {}
    self.variances: dict[str, jax.Array] = {}

  def produced(self, out: Any, kernel: str) -> None:
    """A module owning ``kernel`` returned ``out``."""
    # The innermost kernel-owning module that returns an array claims it.
    if isinstance(out, jax.Array) and id(out) not in self.outputs:
      self.outputs[id(out)] = (out, kernel)

  def consumed(self, x: Any, norm: str) -> str | None:
    """BatchNorm ``norm`` was called on ``x``; returns the paired kernel."""
    found = self.outputs.get(id(x))
    if found is None or found[0] is not x:
      return None
    kernel = found[1]
    if self.pairs.setdefault(kernel, norm) != norm:
      raise ValueError(
          f"{kernel!r} feeds two BatchNorms, {self.pairs[kernel]!r} and "
          f"{norm!r}: its per-neuron scale is ambiguous."
      )
    return kernel

  def interceptor(self, next_fun, args, kwargs, context):
    """``nn.intercept_methods`` hook for linen modules."""
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and args:
      kernel = self.consumed(args[0], "/".join(module.scope.path))
      if kernel is not None and self.capture:
        if kernel in self.variances:
          raise ValueError(
              f"{kernel!r} feeds a BatchNorm more than once in one forward "
              "pass: which call's batch variance to use is ambiguous; use "
              "running_variances instead."
          )
        self.variances[kernel] = jax.lax.stop_gradient(
            _normalizing_variance(module, args, kwargs)
        )
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if module.has_variable("params", "kernel"):
      self.produced(out, "/".join((*module.scope.path, "kernel")))
    return out


def _normalizing_variance(module: nn.BatchNorm, args, kwargs) -> jax.Array:
  """The variance this BatchNorm call divides by (float32, per feature)."""
  x = args[0]
  use_running_average = nn.merge_param(
      "use_running_average",
      module.use_running_average,
      kwargs.get("use_running_average", args[1] if len(args) > 1 else None),
  )
  if use_running_average:
    return jnp.asarray(module.get_variable("batch_stats", "var"), jnp.float32)
  axis = (module.axis,) if isinstance(module.axis, int) else module.axis
  features = {a % x.ndim for a in axis}
  reduce = tuple(a for a in range(x.ndim) if a not in features)
  x = jnp.asarray(x, jnp.float32)
  mask = kwargs.get("mask")
  mean = jnp.mean(x, axis=reduce, where=mask)
  mean_sq = jnp.mean(jnp.square(x), axis=reduce, where=mask)
  if module.axis_name is not None:
    mean, mean_sq = jax.lax.pmean(
        (mean, mean_sq),
        module.axis_name,
        axis_index_groups=module.axis_index_groups,
    )
  # BatchNorm's own (fast) variance, clipped at 0 as BatchNorm does.
  return jnp.maximum(mean_sq - jnp.square(mean), 0.0)


@contextlib.contextmanager
def _recording(capture: bool) -> Iterator[_Recorder]:
  recorder = _Recorder(capture)
  with nn.intercept_methods(recorder.interceptor):
    yield recorder
  recorder.outputs.clear()


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _pure(tree: PyTree) -> PyTree:
  """An NNX state with its Variables unwrapped (what ``nnx.Optimizer`` hands
  optax); any other tree unchanged."""
  return jax.tree.map(
      lambda v: v[...] if _is_variable(v) else v, tree, is_leaf=_is_variable
  )


def _aligned(params: PyTree, table: dict[str, Any]) -> PyTree:
  """A tree like ``params``: ``table[path]`` where given, ``None`` elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: table.get(tree_lib.path_str(p)), _pure(params)
  )


@contextlib.contextmanager
def _patched_calls(classes: set[type], hook) -> Iterator[None]:
  """Routes ``cls.__call__`` through ``hook(original, self, args, kwargs)``.

  NNX has no method interceptors; the classes' ``__call__`` is swapped for
  the duration of one abstract trace and always restored.
  """
  # Resolved before any patching, so a subclass wraps the true original.
  originals = {cls: cls.__call__ for cls in classes}
  own = {
      cls: cls.__dict__["__call__"]
      for cls in classes
      if "__call__" in vars(cls)
  }

  def wrap(original):
    return lambda self, *args, **kwargs: hook(original, self, args, kwargs)

  try:
    for cls, original in originals.items():
      cls.__call__ = wrap(original)
    yield
  finally:
    for cls in classes:
      if cls in own:
        cls.__call__ = own[cls]
      else:
        del cls.__call__


def _pair_nnx(model: nnx.Module, args, kwargs) -> dict[str, str]:
  graphdef, state = nnx.split(model)
  recorder = _Recorder(capture=False)

  def forward(state):
    # A copy: BatchNorm's running statistics are updated in the copy only.
    copy = nnx.merge(graphdef, state)
    paths = {}
    for path, node in nnx.iter_graph(copy):
      if isinstance(node, nnx.Module):
        paths.setdefault(id(node), tuple(str(k) for k in path))

    def hook(original, module, call_args, call_kwargs):
      path = paths.get(id(module))
      if path is not None and isinstance(module, nnx.BatchNorm) and call_args:
        recorder.consumed(call_args[0], "/".join(path))
      out = original(module, *call_args, **call_kwargs)
      if path is not None and isinstance(
          getattr(module, "kernel", None), nnx.Param
      ):
        recorder.produced(out, "/".join((*path, "kernel")))
      return out

    classes = {
        type(node)
        for _, node in nnx.iter_graph(copy)
        if isinstance(node, nnx.Module)
    }
    with _patched_calls(classes, hook):
      copy(*args, **kwargs)
    recorder.outputs.clear()

  jax.eval_shape(forward, state)
  return dict(recorder.pairs)


def pair_batchnorms(
    model: nn.Module | nnx.Module,
    *args: Any,
    rngs: Any = None,
    method: Any = None,
    **kwargs: Any,
) -> dict[str, str]:
  """Pairs every kernel with the BatchNorm that normalizes its output.

  Traces one forward pass abstractly (``jax.eval_shape``: no FLOPs, no
  memory), records the output of every module call that owns a ``kernel``
  parameter (``Conv``, ``Dense``/``Linear`` and the like) and pairs it with
  the ``BatchNorm`` call whose input is that very array. The pairing is by
  data flow, never by module names or creation order. Unpaired kernels (a
  classifier head, a layer followed by an activation before its BatchNorm,
  two convolutions summed before one BatchNorm) are absent.

  ``flax.linen``: traces ``model.init(rngs, *args, **kwargs)`` under
  ``nn.intercept_methods``. ``flax.nnx``: calls a copy of the model
  (``nnx.split``/``nnx.merge``, so its running statistics are not touched)
  while the ``__call__`` of its module classes is briefly wrapped; ``rngs``
  and ``method`` are then unused.

  Args:
    model: a ``flax.linen`` or ``flax.nnx`` module.
    *args: example inputs (shapes matter, not values).
    rngs: linen only: the ``rngs`` for ``init``; default
      ``jax.random.key(0)``.
    method: linen only: the method to trace, as for ``init``.
    **kwargs: keyword arguments for the model (``train=True``).

  Returns:
    ``{kernel path: BatchNorm path}``, paths as :func:`sparseopt_jax.path_str`
    writes them (``"BasicBlock_0/Conv_0/kernel"`` ->
    ``"BasicBlock_0/BatchNorm_0"``), ready for :func:`running_variances`.

  Raises:
    ValueError: a kernel's output feeds two different BatchNorms.

  Examples:
    >>> import jax.numpy as jnp, flax.linen as nn
    >>> from sparseopt_jax import flax_utils
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     x = nn.relu(nn.BatchNorm(True, name="bn")(nn.Dense(4)(x)))
    ...     return nn.Dense(2, name="head")(x)
    >>> flax_utils.pair_batchnorms(Net(), jnp.ones((1, 3)))
    {'Dense_0/kernel': 'bn'}
  """
  if isinstance(model, nnx.Module):
    return _pair_nnx(model, args, kwargs)
  rngs = jax.random.key(0) if rngs is None else rngs
  with _recording(capture=False) as recorder:
    jax.eval_shape(lambda: model.init(rngs, *args, method=method, **kwargs))
  return dict(recorder.pairs)


def running_variances(
    pairs: dict[str, str], params: PyTree, batch_stats: PyTree
) -> PyTree:
  """The ``batch_stats=`` tree for SparseOpt from BatchNorms' running variances.

  Args:
    pairs: from :func:`pair_batchnorms`.
    params: the params the optimizer updates: linen's ``"params"``
      collection, or NNX's ``nnx.state(model, nnx.Param)``.
    batch_stats: linen's ``"batch_stats"`` collection, or NNX's
      ``nnx.state(model, nnx.BatchStat)``.

  Returns:
    A tree like ``params`` (for NNX, like the unwrapped state that
    ``nnx.Optimizer`` hands optax) holding, at each paired kernel, the
    running variance (``var``) of its BatchNorm and ``None`` elsewhere: the
    ``batch_stats=`` keyword of ``scale_by_sparseopt(correction=
    "batch_stats")``. Pure, so it can run inside the jitted step.
  """
  stats = {
      tree_lib.path_str(p): v
      for p, v in jax.tree_util.tree_leaves_with_path(_pure(batch_stats))
  }
  table = {}
  for kernel, norm in pairs.items():
    key = f"{norm}/var"
    if key not in stats:
      raise KeyError(
          f"batch_stats has no {key!r} (the BatchNorm paired with "
          f"{kernel!r}); pass the model's BatchNorm statistics."
      )
    table[kernel] = stats[key]
  return _aligned(params, table)


def apply_with_batch_variances(
    model: nn.Module, variables: PyTree, *args: Any, **kwargs: Any
) -> tuple[Any, PyTree]:
  """``model.apply`` that also returns the variances its BatchNorms used (linen).

  Runs the forward once (no extra pass), pairing kernels with BatchNorms by
  data flow as :func:`pair_batchnorms` does, and records, for each paired
  kernel, the variance its BatchNorm divided by in this call: the current
  batch's in training, the running one with ``use_running_average``. Call it
  inside the loss function and return the tree as auxiliary output; it is
  wrapped in ``stop_gradient``.

  Args:
    model: a ``flax.linen`` module.
    variables: its variables, with a ``"params"`` collection.
    *args: inputs, as for ``model.apply``.
    **kwargs: as for ``model.apply`` (``mutable=["batch_stats"]``,
      ``train=True``, ``rngs=...``).

  Returns:
    ``(model.apply's result, tree)``, the tree like ``variables["params"]``
    with a float32 variance vector at each paired kernel and ``None``
    elsewhere: the ``batch_stats=`` keyword of
    ``scale_by_sparseopt(correction="batch_stats")``.

  Raises:
    ValueError: a kernel's outputs feed BatchNorm calls more than once.

  Examples:
    In a train step::

      def loss_fn(params):
        (logits, new_state), variances = (
            flax_utils.apply_with_batch_variances(
                model, {"params": params, "batch_stats": batch_stats},
                images, train=True, mutable=["batch_stats"]))
        loss = cross_entropy(logits, labels)
        return loss, (new_state, variances)

      (loss, (new_state, variances)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(
          grads, opt_state, params, batch_stats=variances)
  """
  with _recording(capture=True) as recorder:
    out = model.apply(variables, *args, **kwargs)
  return out, _aligned(variables["params"], recorder.variances)
