"""Whole train-step cost: plain SGD vs static masked SGD vs SparseOpt + RigL.

    python -m benchmarks.train_step [--model resnet20 --batch 128 --image 32]

On an accelerator, the two tables users ask for (ResNet-50 at a realistic
batch; ``vit_b16``, an 86M-parameter ViT-B/16, as the transformer-shaped
tree):

    python -m benchmarks.train_step --model resnet50 --batch 256 --image 224 --classes 1000
    python -m benchmarks.train_step --model vit_b16 --batch 256 --image 224 --classes 1000

Times one jitted forward/backward/update of a Flax model (an
`experiments.models` preset, or ``vit_b16``) on synthetic data (the input
pipeline is not part of the step), donating and carrying params, batch stats
and optimizer state as a training loop does, for:

* ``sgd``: ``optax.chain(add_decayed_weights, sgd(momentum))``, no masks;
* ``static``: ``dynamic_sparse(<same>, method="static")`` (masked SGD);
* ``sparseopt_rigl``: ``dynamic_sparse(chain(scale_by_sparseopt(), <same>),
  method="rigl")`` on a normal step;
* ``sparseopt_rigl_update``: the same on a mask-update step;
* ``sparseopt_rigl_recount``: the same on the step after a mask update, where
  ``scale_by_sparseopt`` recomputes its factors from the new masks.

Reports medians of interleaved rounds, images per second, and the RigL cost
amortized over ΔT = 100 steps (98 normal steps, 1 update, 1 recount). Masks
cover the weight kernels (ERK); biases, norms, embeddings stay dense, and
attention kernels count their neurons as `experiments.optimizers` does.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import optax

import sparseopt_jax as sparseopt
from benchmarks import common
from experiments import models
from experiments import optimizers

# ViT-B/16 (Dosovitskiy et al. 2021): 86M parameters at 224x224.
VIT_B16 = dict(d_model=768, depth=12, heads=12, mlp_dim=3072, patch=16)


def create_model(name: str, classes: int):
  if name == "vit_b16":
    return models.ViT(num_classes=classes, **VIT_B16)
  return models.create_model(name, num_classes=classes)


def _is_weight_kernel(path, leaf) -> bool:
  return sparseopt.is_kernel(path, leaf) and sparseopt.path_str(path).endswith(
      "kernel"
  )


def make_step(model, tx, args, fix=lambda out: out):
  """A donating, state-carrying candidate (see ``common.donating``)."""

  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, new = model.apply(
          {"params": p, "batch_stats": batch_stats},
          x,
          train=True,
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new.get("batch_stats", {})

    (loss, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), bs, opt_state, loss

  return common.donating(step, args, carried=(0, 1, 2), fix=fix)


def run(model_name, batch, image, classes, sparsity, rounds):
  model = create_model(model_name, classes)
  x = jax.random.normal(jax.random.key(0), (batch, image, image, 3))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, classes)
  variables = model.init(jax.random.key(2), x[:1], train=False)
  params, bs = variables["params"], variables.get("batch_stats", {})
  masks = sparseopt.init_masks(
      jax.random.key(3),
      params,
      sparsity,
      filter_fn=_is_weight_kernel,
      neuron_axis=optimizers.neuron_axes,
  )
  params = sparseopt.apply_masks(params, masks)

  def base():
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, 0.9))

  def dst(inner, method, count, after_update=False):
    tx = sparseopt.dynamic_sparse(
        inner,
        masks,
        method=method,
        update_every=100,
        end_step=10**6,
        key=jax.random.key(4),
    )

    def rewind(state):
      # The counter and the mask-update flag are reset after each call, so
      # every call times the same kind of step (normal, mask update, or the
      # recount after one).
      return state._replace(
          count=jnp.int32(count), masks_updated=jnp.asarray(after_update)
      )

    return make_step(
        model,
        tx,
        (params, bs, rewind(tx.init(params)), x, y),
        fix=lambda out: (*out[:2], rewind(out[2])),
    )

  sgd = base()
  sparse_inner = optax.chain(
      sparseopt.scale_by_sparseopt(neuron_axis=optimizers.neuron_axes), base()
  )
  cands = {
      "sgd": make_step(model, sgd, (params, bs, sgd.init(params), x, y)),
      "static": dst(base(), "static", 1),
      "sparseopt_rigl": dst(sparse_inner, "rigl", 1),
      "sparseopt_rigl_update": dst(sparse_inner, "rigl", 100),
      "sparseopt_rigl_recount": dst(
          sparse_inner, "rigl", 101, after_update=True
      ),
  }
  samples = common.interleaved_samples(cands, rounds=rounds)
  times = {name: statistics.median(t) for name, t in samples.items()}
  amortized = (
      98 * times["sparseopt_rigl"]
      + times["sparseopt_rigl_update"]
      + times["sparseopt_rigl_recount"]
  ) / 100
  print(common.header())
  print(
      f"\n{model_name}, batch {batch}, {image}x{image}x3, {classes} classes, "
      f"{common.num_params(params) / 1e6:.2f}M params, ERK {sparsity}, "
      f"{rounds} rounds\n"
  )
  print(
      "| variant | median ms/step | images/s | x sgd | min ms/step "
      "| x sgd (min) | spread (IQR / median) |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, t in samples.items():
    q1, _, q3 = statistics.quantiles(t, n=4)
    print(
        f"| {name} | {times[name] * 1e3:.2f} | {batch / times[name]:.1f} | "
        f"{times[name] / times['sgd']:.4f} | {min(t) * 1e3:.2f} | "
        f"{min(t) / min(samples['sgd']):.4f} | "
        f"{(q3 - q1) / times[name]:.3f} |"
    )
  print(
      f"| sparseopt_rigl amortized (ΔT=100) | {amortized * 1e3:.2f} | "
      f"{batch / amortized:.1f} | {amortized / times['sgd']:.4f} | | | |"
  )
  print(
      f"\nmask-update step vs normal SparseOpt+RigL step: "
      f"{times['sparseopt_rigl_update'] / times['sparseopt_rigl']:.3f}x "
      f"(median), {min(samples['sparseopt_rigl_update']) / min(samples['sparseopt_rigl']):.3f}x (min)"
  )
  print(
      f"recount step (after an update) vs normal SparseOpt+RigL step: "
      f"{times['sparseopt_rigl_recount'] / times['sparseopt_rigl']:.3f}x "
      f"(median)"
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
      "--model",
      default="resnet20",
      choices=sorted(models.MODELS) + ["vit_b16"],
  )
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image", type=int, default=32)
  parser.add_argument("--classes", type=int, default=100)
  parser.add_argument("--sparsity", type=float, default=0.9)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  run(
      args.model,
      args.batch,
      args.image,
      args.classes,
      args.sparsity,
      args.rounds,
  )


if __name__ == "__main__":
  main()
