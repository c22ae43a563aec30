"""Sharded parameters (FSDP) on eight simulated CPU devices.

Params, masks and the whole optimizer state of a ``dynamic_sparse`` RigL
step are sharded on each kernel's largest axis over a mesh axis ``"fsdp"``.
The sharded step must choose the same masks as the unsharded one, and its
normal (non-mask-update) steps must never gather a sparse kernel whole.
With ``dynamic_sparse(shardings=...)`` its mask updates must not either
(each device ranks its own piece; only candidates are gathered).

``XLA_FLAGS`` is read when jax starts its backends, so the body runs in a
subprocess (:func:`child_main`) with eight host devices; the test reads the
JSON it prints.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as sparseopt
from sparseopt_jax._src import dst

_TESTS = os.path.dirname(os.path.abspath(__file__))
_DEVICES = 8
# An MLP whose kernels have a largest axis divisible by 8, on either axis,
# and pairwise different sizes (so an all-gather's size names its kernel).
_SHAPES = {"dense0": (64, 256), "dense1": (256, 128), "dense2": (128, 24)}
_UPDATE_EVERY = 2
_STEPS = 7  # Counts 0..6: mask updates at 2, 4 and 6.


def _spec(shape):
  """Shards the largest axis over "fsdp" when it divides; else replicated."""
  if len(shape) < 2 or max(shape) % _DEVICES:
    return jax.sharding.PartitionSpec()
  axis = int(np.argmax(shape))
  return jax.sharding.PartitionSpec(
      *("fsdp" if i == axis else None for i in range(len(shape)))
  )


def _problem(shardings=None):
  """Params, masks, targets, optimizer and train step.

  ``shardings`` goes to ``dynamic_sparse`` (per-shard mask updates); the
  arrays themselves get no shardings here.
  """
  rng = np.random.default_rng(0)
  params, targets = {}, {}
  for name, shape in _SHAPES.items():
    params[name] = {
        "kernel": jnp.asarray(rng.standard_normal(shape, np.float32)),
        "bias": jnp.zeros(shape[-1], jnp.float32),
    }
    targets[name] = {
        "kernel": jnp.asarray(rng.standard_normal(shape, np.float32)),
        "bias": jnp.asarray(rng.standard_normal(shape[-1], np.float32)),
    }
  masks = sparseopt.init_masks(jax.random.key(1), params, 0.8, "erk")
  params = sparseopt.apply_masks(params, masks)
  tx = sparseopt.dynamic_sparse(
      optax.chain(sparseopt.scale_by_sparseopt(), optax.sgd(0.05, 0.9)),
      masks,
      method="rigl",
      update_every=_UPDATE_EVERY,
      end_step=100,
      drop_fraction=0.3,
      key=jax.random.key(2),
      shardings=shardings,
  )

  # A synthetic loss that is elementwise in the weights. An FSDP forward
  # pass all-gathers each kernel for its matmul by design; with this loss
  # nothing but the sparse optimizer could gather a kernel, which is what
  # the HLO check is about.
  def loss_fn(params, targets, scale):
    terms = jax.tree.map(
        lambda p, t: jnp.mean((p - t) ** 2 + 0.1 * jnp.sin(scale * p)),
        params,
        targets,
    )
    return sum(jax.tree.leaves(terms))

  def step(params, state, targets, scale):
    loss, grads = jax.value_and_grad(loss_fn)(params, targets, scale)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return params, masks, targets, tx, step


# --- HLO reading -----------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_ONE_CALL = re.compile(
    r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
    r"=%?([\w.\-]+)"
)
_MANY_CALLS = re.compile(
    r"\b(?:branch_computations|called_computations)=\{([^}]*)\}"
)
_SHAPE = re.compile(r"\b[a-z]\w*\[([\d,]*)\]")


def _computations(hlo):
  """{name: [instruction lines]} and the entry computation's name."""
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    if name is None:
      m = _COMPUTATION.match(line)
      if m and not line.startswith(" "):
        name = m.group(1)
        comps[name] = []
        if line.startswith("ENTRY"):
          entry = name
    elif line.startswith("}"):
      name = None
    else:
      comps[name].append(line)
  return comps, entry


def _callees(line):
  out = _ONE_CALL.findall(line)
  for group in _MANY_CALLS.findall(line):
    out += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
  return out


def _reachable(comps, roots, skip=frozenset()):
  seen, todo = set(), list(roots)
  while todo:
    c = todo.pop()
    if c in seen or c in skip or c not in comps:
      continue
    seen.add(c)
    for line in comps[c]:
      todo += _callees(line)
  return seen


def _ranks(comps, names):
  """Whether the computations hold a top-k or sort (the mask update)."""
  return any(
      re.search(r"\b(sort|topk)\(|TopK", line)
      for c in names
      for line in comps[c]
  )


def _split_update_branch(hlo):
  """(normal-step computations, mask-update-branch computations).

  The mask update is the body of the loop (``lax.while_loop``, run once at
  mask updates and never otherwise) or the ``lax.cond`` branch that ranks
  (``lax.top_k`` turns into a TopK or a sort). A normal step runs every
  computation reachable from the entry without entering such a body; every
  other branch (e.g. ``scale_by_sparseopt``'s factor recompute) and every
  loop condition counts as normal, which makes the check stricter.
  """
  comps, entry = _computations(hlo)
  update = set()
  for lines in comps.values():
    for line in lines:
      if " conditional(" in line:
        bodies = _callees(line)
      elif " while(" in line:
        bodies = re.findall(r"\bbody=%?([\w.\-]+)", line)
      else:
        continue
      for body in bodies:
        names = _reachable(comps, [body])
        if _ranks(comps, names):
          update.add(body)
  normal = _reachable(comps, [entry], skip=frozenset(update))
  in_update = _reachable(comps, sorted(update)) - normal
  return comps, normal, in_update


def _full_kernel_collectives(comps, names, kernel_sizes):
  """Collectives whose result holds as many elements as a whole kernel.

  An ``all-gather`` whose output has a sparse kernel's element count (in any
  shape: the kernel, its flat view, one element of a tuple-shaped combined
  all-gather) puts that whole kernel on every device. An ``all-reduce`` of
  that size is the other way XLA materializes a sharded array everywhere
  (a zero-padded local piece summed over devices), so it counts too.
  """
  found = []
  for c in names:
    for line in comps[c]:
      op = re.search(r"\s(all-gather|all-reduce)(?:-start)?\(", line)
      if not op or "=" not in line:
        continue
      result = line.split("=", 1)[1][: op.start() - line.index("=") - 1]
      for dims in _SHAPE.findall(result):
        size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        if size in kernel_sizes:
          found.append(f"{op.group(1)} {kernel_sizes[size]}: {line.strip()}")
  return found


# --- The subprocess --------------------------------------------------------


def child_main():
  """Runs both programs and prints a JSON report on stdout."""
  assert jax.device_count() == _DEVICES, jax.devices()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("fsdp",))

  def shardings(tree):
    return jax.tree.map(
        lambda x: jax.sharding.NamedSharding(mesh, _spec(np.shape(x))), tree
    )

  params, masks, targets, tx, step = _problem()
  state_shape = jax.eval_shape(tx.init, params)
  p_sh, s_sh, t_sh = (
      shardings(params),
      shardings(state_shape),
      shardings(targets),
  )
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.jit(
      step,
      in_shardings=(p_sh, s_sh, t_sh, repl),
      out_shardings=(p_sh, s_sh, repl),
      donate_argnums=(0, 1),
  )
  plain = jax.jit(step, donate_argnums=(0, 1))

  def run(fn, params, state, targets):
    record = []
    for t in range(_STEPS):
      params, state, loss = fn(params, state, targets, jnp.float32(1.0 + t))
      m = sparseopt.get_masks(state)
      record.append(
          {
              "loss": float(loss),
              "updated": bool(sparseopt.masks_updated(state)),
              "itop": float(sparseopt.itop_rate(state)),
              "masks": {
                  k: np.asarray(v["kernel"]).tolist() for k, v in m.items()
              },
              "active": {k: int(np.sum(v["kernel"])) for k, v in m.items()},
              "changed": {
                  k: int(v["kernel"]) for k, v in state.num_changed.items()
              },
          }
      )
    return record, params, state

  plain_record, _, _ = run(
      plain, jax.tree.map(jnp.copy, params), tx.init(params), targets
  )
  sp = jax.device_put(params, p_sh)
  ss = jax.jit(tx.init, in_shardings=(p_sh,), out_shardings=s_sh)(sp)
  st = jax.device_put(targets, t_sh)
  # Lower before running: the run donates (deletes) sp and ss.
  hlo = sharded.lower(sp, ss, st, jnp.float32(1.0)).compile().as_text()
  kernel_sharding = {k: str(v["kernel"].sharding.spec) for k, v in sp.items()}
  state_masks_sharding = {
      k: str(v["kernel"].sharding.spec)
      for k, v in sparseopt.get_masks(ss).items()
  }
  sharded_record, sp_out, ss_out = run(sharded, sp, ss, st)
  out_sharding = {
      "params": {k: str(v["kernel"].sharding.spec) for k, v in sp_out.items()},
      "masks": {
          k: str(v["kernel"].sharding.spec)
          for k, v in sparseopt.get_masks(ss_out).items()
      },
  }

  # Control: the same step with one kernel's output replicated must show a
  # full-kernel all-gather in its normal step, or the check sees nothing.
  control_p_sh = dict(p_sh)
  control_p_sh["dense1"] = {**p_sh["dense1"], "kernel": repl}
  control = jax.jit(
      step,
      in_shardings=(p_sh, s_sh, t_sh, repl),
      out_shardings=(control_p_sh, s_sh, repl),
  )
  control_hlo = control.lower(sp_out, ss_out, st, jnp.float32(1.0))
  control_hlo = control_hlo.compile().as_text()

  # The same step with dynamic_sparse(shardings=p_sh): mask updates select
  # per shard. Same masks; its update branch is checked like the normal step.
  # Fresh arrays: the runs above donated theirs (and device_put may alias).
  params_ps, masks_ps, _, tx_ps, step_ps = _problem(p_sh)
  per_shard = jax.jit(
      step_ps,
      in_shardings=(p_sh, s_sh, t_sh, repl),
      out_shardings=(p_sh, s_sh, repl),
      donate_argnums=(0, 1),
  )
  pp = jax.device_put(params_ps, p_sh)
  ps = jax.jit(tx_ps.init, in_shardings=(p_sh,), out_shardings=s_sh)(pp)
  ps_hlo = per_shard.lower(pp, ps, st, jnp.float32(1.0)).compile().as_text()
  per_shard_record, pp_out, ps_out = run(per_shard, pp, ps, st)
  per_shard_out_sharding = {
      "params": {k: str(v["kernel"].sharding.spec) for k, v in pp_out.items()},
      "masks": {
          k: str(v["kernel"].sharding.spec)
          for k, v in sparseopt.get_masks(ps_out).items()
      },
  }
  # Whether a piece's candidates (min(k_max, piece) of them) are fewer than
  # its entries: otherwise the merge sees the whole layer, by design.
  candidates_smaller = {
      k: _DEVICES
      * min(dst._max_changes(m["kernel"], 0.3), m["kernel"].size // _DEVICES)
      < m["kernel"].size
      for k, m in masks_ps.items()
  }

  sizes = {int(np.prod(s)): k for k, s in _SHAPES.items()}
  comps, normal, update = _split_update_branch(hlo)
  c_comps, c_normal, _ = _split_update_branch(control_hlo)
  ps_comps, ps_normal, ps_update = _split_update_branch(ps_hlo)
  print(
      json.dumps(
          {
              "plain": plain_record,
              "sharded": sharded_record,
              "kernel_sharding": kernel_sharding,
              "state_masks_sharding": state_masks_sharding,
              "out_sharding": out_sharding,
              "num_update_computations": len(update),
              "normal_gathers": _full_kernel_collectives(comps, normal, sizes),
              "update_gathers": _full_kernel_collectives(comps, update, sizes),
              "control_gathers": _full_kernel_collectives(
                  c_comps, c_normal, sizes
              ),
              "per_shard": per_shard_record,
              "per_shard_out_sharding": per_shard_out_sharding,
              "per_shard_candidates_smaller": candidates_smaller,
              "per_shard_num_update_computations": len(ps_update),
              "per_shard_normal_gathers": _full_kernel_collectives(
                  ps_comps, ps_normal, sizes
              ),
              "per_shard_update_gathers": _full_kernel_collectives(
                  ps_comps, ps_update, sizes
              ),
          }
      )
  )


@pytest.fixture(scope="module")
def report():
  env = {
      **os.environ,
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={_DEVICES}",
      "JAX_PLATFORMS": "cpu",
  }
  code = (
      f"import sys; sys.path.insert(0, {_TESTS!r}); "
      "import test_sharding; test_sharding.child_main()"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_run_matches_unsharded(report):
  plain, sharded = report["plain"], report["sharded"]
  assert len(plain) == len(sharded) == _STEPS
  # Mask updates at counts 2, 4 and 6: the first three, all compared.
  assert [r["updated"] for r in sharded] == [
      t > 0 and t % _UPDATE_EVERY == 0 for t in range(_STEPS)
  ]
  assert all(n > 0 for n in sharded[-1]["changed"].values())
  for t, (a, b) in enumerate(zip(plain, sharded)):
    assert a["masks"] == b["masks"], t  # Exactly the same topology.
    assert a["active"] == b["active"] == plain[0]["active"], t
    assert a["changed"] == b["changed"], t
    assert a["itop"] == b["itop"], t
    # Sums over sharded leaves add in another order: float tolerance.
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), t


def test_state_stays_sharded(report):
  for name, shape in _SHAPES.items():
    want = str(_spec(shape))
    assert "fsdp" in want
    assert report["kernel_sharding"][name] == want
    assert report["state_masks_sharding"][name] == want
    assert report["out_sharding"]["params"][name] == want
    assert report["out_sharding"]["masks"][name] == want


def test_normal_step_gathers_no_sparse_kernel(report):
  # How the check works: the compiled HLO is split into computations; the
  # mask update is the loop body that ranks (TopK or sort), and
  # the normal step is everything reachable from the entry without entering
  # it. There, no all-gather (nor all-reduce) may produce as many elements
  # as a sparse kernel, in whatever shape.
  assert report["num_update_computations"] > 0  # The branch was found.
  assert report["normal_gathers"] == []
  # Control: the same step with dense1's kernel replicated on output gathers
  # it whole in its normal step, and the check sees it.
  assert any(
      g.startswith("all-gather dense1") for g in report["control_gathers"]
  )
  # Without dynamic_sparse(shardings=...) the mask-UPDATE branch does
  # gather a layer that lax.top_k ranks (below dst.SELECT_MIN_SIZE): top_k
  # on its flat scores, sharded over "fsdp", all-gathers the whole score
  # vector onto every device, and a kernel sharded on a non-leading axis
  # (dense0) is gathered whole for its reshape(-1). This is the control for
  # test_per_shard_update_gathers_no_layer: the same check sees that gather
  # here. dense1 (32768 entries, sharded on its leading axis) is selected by
  # counting, whose passes are reductions: nothing of it is gathered.
  gathered = {g.split(":")[0].split()[1] for g in report["update_gathers"]}
  assert "dense0" in gathered, report["update_gathers"]
  assert "dense1" not in gathered, report["update_gathers"]


def test_per_shard_run_matches_unsharded(report):
  # dynamic_sparse(shardings=...) chooses exactly the same masks.
  plain, per_shard = report["plain"], report["per_shard"]
  assert len(per_shard) == _STEPS
  assert sum(r["updated"] for r in per_shard) == 3
  assert all(n > 0 for n in per_shard[-1]["changed"].values())
  for t, (a, b) in enumerate(zip(plain, per_shard)):
    assert a["masks"] == b["masks"], t
    assert a["active"] == b["active"], t
    assert a["changed"] == b["changed"], t
    assert a["itop"] == b["itop"], t
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), t
  for name, shape in _SHAPES.items():
    assert report["per_shard_out_sharding"]["params"][name] == str(_spec(shape))
    assert report["per_shard_out_sharding"]["masks"][name] == str(_spec(shape))


def test_per_shard_update_gathers_no_layer(report):
  # With shardings=..., each device ranks its own piece and only the
  # pieces' candidates (values and flat indices) are gathered: the mask
  # update all-gathers no sparse kernel's worth of elements, in any shape,
  # for a kernel whose candidates are fewer than its entries. dense0 is
  # sharded on its non-leading axis, dense1 on its leading one.
  assert report["per_shard_num_update_computations"] > 0
  assert report["per_shard_normal_gathers"] == []
  smaller = report["per_shard_candidates_smaller"]
  assert smaller["dense0"] and smaller["dense1"]
  for g in report["per_shard_update_gathers"]:
    name = g.split(":")[0].split()[1]
    assert not smaller[name], g
  # dense2 (128 x 24, ERK-dense) may replace more connections per update
  # than a piece holds (k_max >= 384), so its candidates are all its
  # entries and the merge gathers the whole layer's scores: the limit of
  # per-shard candidates, recorded here rather than hidden.
  assert not smaller["dense2"]
