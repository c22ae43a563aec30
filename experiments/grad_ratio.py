r"""Reproduction A: BatchNorm amplifies the gradients of sparse neurons.

  python -m experiments.grad_ratio [--out=experiments/results/grad_ratio]

The paper's 2-layer MLP (784 -> hidden -> 10) on Fashion-MNIST. For each
sparsity ``s`` the first layer is pruned with a random mask; on the same
initialization and the same batch we compare its gradient with the dense
network's gradient at the *same* (surviving) weights:

    ratio = mean_{active w} |g_sparse(w)| / mean_{active w} |g_dense(w)|

three ways: with BatchNorm after the layer, without BatchNorm, and with
BatchNorm plus ``sparseopt.scale_by_sparseopt`` applied to the sparse
gradient. Theory: BN divides neuron ``i``'s backward signal by a batch std
that shrinks like ``sqrt(1 - s_i)``, so the ratio follows ``1/sqrt(1 - s)``
with BN and stays near 1 without.

SparseOpt's factor ``sqrt(1 - s_i) / sqrt(1 - s_avg)`` removes the *spread*
of that amplification across a layer's neurons but keeps the layer's mean,
so on a mask whose neurons all have about the same sparsity it changes the
ratio little. The second measurement shows what it does remove: a mask
whose neuron sparsities ``s_i`` spread uniformly over ``s +- w`` (``w`` =
half the distance to 0 or 1), and the per-neuron ratio ``r_i`` against
``1/sqrt(1 - s_i)``; the table reports the least-squares slope of
``log r_i`` on ``log(1/sqrt(1 - s_i))`` (1: the full BN skew, 0: none).

Writes ``grad_ratio.png`` and ``grad_ratio.md`` under ``--out``.
"""

import os
import time
from collections.abc import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sparseopt_jax as sparseopt

from experiments import input_pipeline
from experiments import models
from experiments.studies import markdown

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)


def _grads_fn(model):
  @jax.jit
  def grads(params, batch_stats, images, labels):
    def loss_fn(params):
      logits, _ = model.apply(
          {"params": params, "batch_stats": batch_stats},
          images,
          train=True,
          mutable=["batch_stats"],
      )
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels
      ).mean()

    return jax.grad(loss_fn)(params)["hidden"]["kernel"]

  return grads


def random_mask(rng: np.random.Generator, shape, sparsities) -> np.ndarray:
  """A (fan_in, neurons) mask; neuron i keeps round((1 - s_i) * fan_in) inputs."""
  fan_in, neurons = shape
  mask = np.zeros(shape, bool)
  for i, s in enumerate(np.broadcast_to(sparsities, (neurons,))):
    keep = max(1, int(round((1 - s) * fan_in)))
    mask[rng.choice(fan_in, keep, replace=False), i] = True
  return mask


def measure(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    sparsities: Sequence[float] = SPARSITIES,
    hidden: int = 256,
    num_seeds: int = 3,
    num_batches: int = 4,
    batch_size: int = 256,
):
  """Gradient ratios per sparsity, averaged over seeds and batches.

  Args:
    images: (N, H, W, C) normalized float images.
    labels: (N,) int labels.
    sparsities: first-layer sparsities to measure.
    hidden: MLP width.
    num_seeds: initializations (and masks) per sparsity.
    num_batches: batches per initialization.
    batch_size: examples per batch.

  Returns:
    dict sparsity -> dict with the mean ratios ``bn``, ``no_bn``,
    ``bn_sparseopt``, the per-neuron slopes ``slope_bn``,
    ``slope_bn_sparseopt`` (spread mask), and ``neurons`` (s_i, r_i with
    BN, r_i with BN + SparseOpt) of every seed's neurons, for plotting.
  """
  num_classes = int(labels.max()) + 1
  bn_model = models.MLP(num_classes=num_classes, hidden=hidden, use_bn=True)
  plain_model = models.MLP(num_classes=num_classes, hidden=hidden, use_bn=False)
  grads_bn, grads_plain = _grads_fn(bn_model), _grads_fn(plain_model)
  correct = sparseopt.scale_by_sparseopt()

  def corrected(g, mask):
    # The first layer alone, as a one-leaf tree; every neuron has BN after it.
    out, _ = correct.update(
        {"w": g}, correct.init({"w": g}), masks={"w": jnp.asarray(mask)}
    )
    return out["w"]

  def ratio(g_sparse, g_dense, mask):
    return float(
        jnp.sum(jnp.abs(g_sparse) * mask) / jnp.sum(jnp.abs(g_dense) * mask)
    )

  rng = np.random.default_rng(0)
  results = {}
  for s in sparsities:
    acc = {
        k: []
        for k in (
            "bn",
            "no_bn",
            "bn_sparseopt",
            "slope_bn",
            "slope_bn_sparseopt",
        )
    }
    neurons = []
    for seed in range(num_seeds):
      key = jax.random.PRNGKey(seed)
      dummy = jnp.zeros((1, *images.shape[1:]))
      bn_vars = bn_model.init(key, dummy, train=False)
      plain_vars = plain_model.init(key, dummy, train=False)
      kernel = bn_vars["params"]["hidden"]["kernel"]
      # Same kernel for both models: flax seeds each parameter by its path.
      assert np.array_equal(kernel, plain_vars["params"]["hidden"]["kernel"])
      width = min(s, 1 - s) / 2
      uniform = random_mask(rng, kernel.shape, s)
      spread = random_mask(
          rng, kernel.shape, rng.uniform(s - width, s + width, kernel.shape[1])
      )

      def with_kernel(variables, mask, kernel=kernel):
        params = {
            **variables["params"],
            "hidden": {
                **variables["params"]["hidden"],
                "kernel": kernel * mask,
            },
        }
        return params, variables.get("batch_stats", {})

      # Per-neuron |g| summed over batches: the sparse neuron computes a
      # different function than the dense one, so single-batch ratios are
      # noisy per neuron; the sums are not.
      sums = np.zeros((3, kernel.shape[1]))
      for _ in range(num_batches):
        idx = rng.choice(len(labels), batch_size, replace=False)
        x, y = jnp.asarray(images[idx]), jnp.asarray(labels[idx])
        g_bn_d = grads_bn(bn_vars["params"], bn_vars["batch_stats"], x, y)
        g_pl_d = grads_plain(plain_vars["params"], {}, x, y)
        g_bn_s = grads_bn(*with_kernel(bn_vars, uniform), x, y)
        g_pl_s = grads_plain(*with_kernel(plain_vars, uniform), x, y)
        acc["bn"].append(ratio(g_bn_s, g_bn_d, uniform))
        acc["no_bn"].append(ratio(g_pl_s, g_pl_d, uniform))
        acc["bn_sparseopt"].append(
            ratio(corrected(g_bn_s, uniform), g_bn_d, uniform)
        )
        g_bn_s = grads_bn(*with_kernel(bn_vars, spread), x, y)
        sums += np.stack(
            [
                np.asarray(jnp.sum(jnp.abs(g) * spread, 0))
                for g in (g_bn_d, g_bn_s, corrected(g_bn_s, spread))
            ]
        )
      s_i = 1 - spread.mean(0)
      log_amp = -0.5 * np.log1p(-s_i)
      r_bn, r_c = sums[1] / sums[0], sums[2] / sums[0]
      acc["slope_bn"].append(np.polyfit(log_amp, np.log(r_bn), 1)[0])
      acc["slope_bn_sparseopt"].append(np.polyfit(log_amp, np.log(r_c), 1)[0])
      neurons.append((s_i, r_bn, r_c))
    results[s] = {k: float(np.mean(v)) for k, v in acc.items()}
    results[s]["neurons"] = tuple(np.concatenate(v) for v in zip(*neurons))
  return results


def markdown_table(results) -> str:
  """The ratios of `measure` per sparsity, next to 1/sqrt(1-s)."""
  keys = ("bn", "no_bn", "bn_sparseopt", "slope_bn", "slope_bn_sparseopt")
  return markdown.table(
      [
          "sparsity s",
          "1/sqrt(1-s)",
          "with BN",
          "without BN",
          "BN + SparseOpt",
          "neuron slope, BN",
          "neuron slope, BN + SparseOpt",
      ],
      [
          [s, f"{1 / np.sqrt(1 - s):.2f}", *(f"{r[k]:.2f}" for k in keys)]
          for s, r in results.items()
      ],
  )


def plot(results, path: str, detail_sparsity: float = 0.9) -> None:
  """Left: mean ratio vs s. Right: per-neuron ratio vs 1/sqrt(1-s_i)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  s = np.array(list(results))
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  fine = np.linspace(s.min(), s.max(), 200)
  ax.plot(fine, 1 / np.sqrt(1 - fine), "k:", label="theory 1/sqrt(1-s)")
  for key, label, marker in (
      ("bn", "with BN", "o"),
      ("bn_sparseopt", "BN + SparseOpt", "x"),
      ("no_bn", "without BN", "s"),
  ):
    ax.plot(s, [results[v][key] for v in s], marker=marker, label=label)
  ax.set_yscale("log")
  ax.set_xlabel("first-layer sparsity s")
  ax.set_ylabel("mean |g_sparse| / |g_dense| (same weights)")
  ax.set_title("Layer-mean gradient ratio (random mask)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)

  detail = min(results, key=lambda v: abs(v - detail_sparsity))
  s_i, r_bn, r_c = results[detail]["neurons"]
  amp = 1 / np.sqrt(1 - s_i)
  # Single neurons are noisy (a pruned neuron computes another function than
  # its dense self); geometric means over amplification bins show the trend.
  edges = np.quantile(amp, np.linspace(0, 1, 9))
  bins = np.clip(np.searchsorted(edges, amp, side="right") - 1, 0, 7)
  centers = [amp[bins == b].mean() for b in range(8)]
  for r, label, color in (
      (r_bn, "with BN", "tab:blue"),
      (r_c, "BN + SparseOpt", "tab:orange"),
  ):
    ax2.scatter(amp, r, s=3, alpha=0.25, color=color)
    ax2.plot(
        centers,
        [np.exp(np.log(r[bins == b]).mean()) for b in range(8)],
        "o-",
        color=color,
        label=f"{label} (binned geometric mean)",
    )
  ref = np.exp(np.log(r_bn).mean()) / np.exp(np.log(amp).mean())
  line = np.linspace(amp.min(), amp.max(), 50)
  ax2.plot(line, ref * line, "k:", label="proportional to 1/sqrt(1-s_i)")
  ax2.set_yscale("log")
  ax2.set_xlabel("neuron amplification 1/sqrt(1-s_i)")
  ax2.set_ylabel("per-neuron gradient ratio r_i")
  ax2.set_title(f"Per neuron, s={detail}, neuron sparsities spread")
  ax2.grid(alpha=0.3, which="both")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.perf_counter()
  dataset = input_pipeline.load_dataset("fashion_mnist", FLAGS.data_dir or None)
  train = dataset.train
  images = np.asarray(input_pipeline.normalize(train.images, dataset.spec))
  results = measure(
      images,
      train.labels,
      hidden=FLAGS.hidden,
      num_seeds=FLAGS.num_seeds,
      num_batches=FLAGS.num_batches,
      batch_size=FLAGS.batch_size,
  )
  os.makedirs(FLAGS.out, exist_ok=True)
  table = markdown_table(results)
  png = os.path.join(FLAGS.out, "grad_ratio.png")
  plot(results, png)
  setup = (
      f"2-layer MLP 784-{FLAGS.hidden}-10, Fashion-MNIST, "
      f"{FLAGS.num_seeds} seeds x {FLAGS.num_batches} batches of "
      f"{FLAGS.batch_size}. Ratios: mean |g| of the sparse first layer "
      "over the dense network's |g| at the same weights (random mask). "
      "Neuron slope: least-squares slope of log r_i on "
      "log(1/sqrt(1-s_i)) over neurons, on a mask whose neuron "
      "sparsities spread over s +- min(s, 1-s)/2 (1 = full BN skew, "
      "0 = none)."
  )
  with open(os.path.join(FLAGS.out, "grad_ratio.md"), "w") as f:
    f.write(f"{setup}\n\n{table}\n")
  print(
      f"{setup}\n\n{table}\n\nPlot written to {os.path.abspath(png)} "
      f"({time.perf_counter() - start:.0f}s)"
  )


if __name__ == "__main__":
  flags.DEFINE_string("out", "experiments/results/grad_ratio", "Output folder.")
  flags.DEFINE_string(
      "data_dir", "", "Fashion-MNIST location (see input_pipeline)."
  )
  flags.DEFINE_integer("num_seeds", 5, "Initializations per sparsity.")
  flags.DEFINE_integer("num_batches", 8, "Batches per initialization.")
  flags.DEFINE_integer("batch_size", 256, "Examples per batch.")
  flags.DEFINE_integer("hidden", 256, "MLP width.")
  app.run(main)
