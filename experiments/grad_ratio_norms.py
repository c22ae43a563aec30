r"""Reproduction A for other normalizers: whose gradients does sparsity skew?

  python -m experiments.grad_ratio_norms [--out=experiments/results/grad_ratio_norms]

`experiments.grad_ratio` measures BatchNorm's per-neuron amplification
``(1 - s_i)^-1/2`` of a sparse layer's gradient. A normalizer divides by one
sigma per reduction group, so the amplification should be shared by its
group (docs/theory.md, "the unit of skew is the normalizer's
group"). Four Flax blocks on Gaussian tokens, with a random linear readout
and cross-entropy to random labels:

* ``post_ln``: sparse Dense, then LayerNorm (one sigma per token over all of
  the layer's outputs): expect a layer-wide ``(1 - s)^-1/2``, no per-neuron
  skew.
* ``rmsnorm``: the same with RMSNorm.
* ``qk_norm``: attention whose q and k projections are sparse and
  RMS-normalized per head over ``head_dim``: expect per-head skew
  ``(1 - s_h)^-1/2``.
* ``pre_ln``: a pre-LN transformer block, every projection sparse, nothing
  normalizing their outputs: expect little skew.

For each, on the same initialization and batch, the sparse network's gradient
is compared with the dense network's at the same (surviving) weights. Per
unit ``u`` of the measured layers (a neuron; a head for ``qk_norm``):

    r_u = sum_{active w in u} |g_sparse(w)| / sum_{active w in u} |g_dense(w)|

summed over batches. The *layer ratio* pools all active weights of the
measured layers on a mask whose neurons are all equally sparse; the *unit
slope* is the least-squares slope of ``log r_u`` on ``log (1 - s_u)^-1/2``
(1: the full skew, as under BatchNorm; 0: none), on two uneven masks: units'
sparsities spread uniformly over ``s +- min(s, 1 - s) / 2``, and ERK masks from
``sparseopt.init_masks`` (unstructured, so neuron sparsities vary binomially).
"+ factor" applies the paper's per-neuron factor
``sparseopt.diagnostics.fan_in_scale`` to the sparse gradient first; "+
group factor" applies the factor of the normalizer's group instead
(`group_factor`): per head for ``qk_norm`` (``scale_by_sparseopt`` with
``neuron_axis=1`` on the ``(d_model, heads, head_dim)`` kernel), none for the
others (one sigma per token for the layer: the normalized factor is 1).

Writes ``grad_ratio_norms.md`` and ``grad_ratio_norms.png`` under ``--out``.
"""

import dataclasses
import os
import time
from collections.abc import Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sparseopt_jax as sparseopt

from experiments.grad_ratio import random_mask
from experiments.studies import markdown

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
CLASSES = 10


class PostNorm(nn.Module):
  """Sparse Dense, then LayerNorm or RMSNorm, GELU and the readout."""

  norm: str = "layer"
  hidden: int = 256

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, name="dense")(x)
    h = nn.LayerNorm()(h) if self.norm == "layer" else nn.RMSNorm()(h)
    return nn.Dense(CLASSES, name="readout")(nn.gelu(h))


class QKNormAttention(nn.Module):
  """Self-attention with RMSNorm per head over head_dim on q and k."""

  heads: int = 8
  head_dim: int = 8

  @nn.compact
  def __call__(self, x):
    width, split = self.heads * self.head_dim, (self.heads, self.head_dim)
    q = nn.Dense(width, name="q")(x).reshape(*x.shape[:-1], *split)
    k = nn.Dense(width, name="k")(x).reshape(*x.shape[:-1], *split)
    v = nn.Dense(width, name="v")(x).reshape(*x.shape[:-1], *split)
    q, k = nn.RMSNorm(name="q_norm")(q), nn.RMSNorm(name="k_norm")(k)
    out = nn.dot_product_attention(q, k, v).reshape(*x.shape[:-1], width)
    x = x + nn.Dense(x.shape[-1], name="o")(out)
    return nn.Dense(CLASSES, name="readout")(x)


class PreLNBlock(nn.Module):
  """A pre-LN transformer block: LN, attention, residual; LN, GELU MLP."""

  heads: int = 8
  mlp_ratio: int = 4

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    split = (self.heads, d // self.heads)
    h = nn.LayerNorm(name="ln1")(x)
    q, k, v = (
        nn.Dense(d, name=n)(h).reshape(*x.shape[:-1], *split) for n in "qkv"
    )
    out = nn.dot_product_attention(q, k, v).reshape(x.shape)
    x = x + nn.Dense(d, name="o")(out)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.gelu(nn.Dense(self.mlp_ratio * d, name="up")(h))
    x = x + nn.Dense(d, name="down")(h)
    return nn.Dense(CLASSES, name="readout")(nn.LayerNorm(name="ln_f")(x))


@dataclasses.dataclass(frozen=True)
class Group:
  """Layers measured together; ``unit`` consecutive output columns are a unit."""

  layers: tuple[str, ...]
  unit: int = 1


@dataclasses.dataclass(frozen=True)
class Case:
  """A model, its sparse layers, and the groups of layers to measure."""

  name: str
  model: nn.Module
  sparse: tuple[str, ...]
  groups: tuple[Group, ...]


def cases(d_model: int = 64, heads: int = 8) -> tuple[Case, ...]:
  """The four normalizer settings, for tokens of width ``d_model``."""
  head_dim = d_model // heads
  return (
      Case("post_ln", PostNorm("layer", 4 * d_model), ("dense",),
           (Group(("dense",)),)),
      Case("rmsnorm", PostNorm("rms", 4 * d_model), ("dense",),
           (Group(("dense",)),)),
      Case("qk_norm", QKNormAttention(heads, head_dim), ("q", "k"),
           (Group(("q", "k"), head_dim),)),
      Case("pre_ln", PreLNBlock(heads), ("q", "k", "v", "o", "up", "down"),
           (Group(("q", "k", "v")), Group(("up",)), Group(("o", "down")))),
  )  # fmt: skip


def _grads_fn(model):
  @jax.jit
  def grads(params, x, labels):
    def loss_fn(params):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels
      ).mean()

    return jax.grad(loss_fn)(params)

  return grads


def _spread_masks(rng, params, case, s):
  """Per-unit sparsities uniform over s +- min(s, 1-s)/2, shared in a unit."""
  unit = {n: g.unit for g in case.groups for n in g.layers}
  width = min(s, 1 - s) / 2
  out = {}
  for name in case.sparse:
    shape = params[name]["kernel"].shape
    size = unit.get(name, 1)
    s_u = rng.uniform(s - width, s + width, shape[1] // size)
    out[name] = random_mask(rng, shape, np.repeat(s_u, size))
  return out


def _erk_masks(key, params, case, s):
  def is_sparse(path, leaf):
    del leaf
    return path[0].key in case.sparse and path[-1].key == "kernel"

  masks = sparseopt.init_masks(key, params, s, "erk", filter_fn=is_sparse)
  return {n: np.asarray(masks[n]["kernel"]) for n in case.sparse}


def group_factor(mask: np.ndarray, unit: int) -> np.ndarray:
  """The normalizer-group factor of a ``(d_model, width)`` kernel's mask.

  A unit of ``unit`` consecutive columns (a head of ``head_dim`` for
  QK-norm) is one neuron of ``scale_by_sparseopt(neuron_axis=1)`` on the
  kernel seen as ``(d_model, heads, head_dim)``: its factor is
  ``sqrt(1 - s_h) / sqrt(1 - s_avg)`` over the heads, constant in a head.
  With ``unit == 1`` the group is the whole layer (post-LN, RMSNorm; pre-LN
  has no normalizer after its projections): the normalized factor is 1.
  """
  if unit == 1:
    return np.ones(mask.shape[1], np.float32)
  heads = mask.reshape(mask.shape[0], -1, unit)
  factor = sparseopt.diagnostics.fan_in_scale(jnp.asarray(heads), 1)
  return np.repeat(np.asarray(factor), unit)


def _unit_sums(group, g_sparse, g_dense, masks):
  """Per-unit sums of |g| over active weights.

  Rows: sparse, scaled by the per-neuron factor, scaled by the group
  factor (`group_factor`), dense.
  """
  sums = []
  for name in group.layers:
    m = masks[name]
    gs, gd = (np.asarray(g[name]["kernel"]) for g in (g_sparse, g_dense))
    factor = np.asarray(sparseopt.diagnostics.fan_in_scale(jnp.asarray(m)))
    grouped = group_factor(m, group.unit)
    cols = np.stack(
        [np.sum(np.abs(g) * m, 0) for g in (gs, gs * factor, gs * grouped, gd)]
    )
    sums.append(cols.reshape(4, -1, group.unit).sum(-1))
  return np.concatenate(sums, 1)


def _unit_density(group, masks):
  """Per-unit density ``1 - s_u`` and the index of the unit's layer."""
  density, layer = [], []
  for i, name in enumerate(group.layers):
    m = masks[name].reshape(-1, masks[name].shape[1] // group.unit, group.unit)
    density.append(m.mean((0, 2)))
    layer.append(np.full(m.shape[1], i))
  return np.concatenate(density), np.concatenate(layer)


def _ratio(num, den):
  """num / den, 0 where a unit has no gradient at all (no active outputs)."""
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _slope(density, layer, ratios):
  """Slope of log r_u on log (1 - s_u)^-1/2 within layers, live units only.

  Each layer's units are centred on their own means (one intercept per
  layer): the skew is between a layer's units, and under ERK a group's
  layers have different sparsities and different overall ratios.
  """
  # A mask can leave a unit without inputs (ERK) or without outputs (a
  # hidden unit all of whose outgoing weights are pruned): no gradient, no
  # ratio.
  live = (density > 0) & (ratios > 0)
  x, y, layer = -0.5 * np.log(density[live]), np.log(ratios[live]), layer[live]
  for i in np.unique(layer):
    x[layer == i] -= x[layer == i].mean()
    y[layer == i] -= y[layer == i].mean()
  return float(np.sum(x * y) / np.sum(x * x))


def measure(
    *,
    sparsities: Sequence[float] = SPARSITIES,
    d_model: int = 64,
    heads: int = 8,
    tokens: int = 16,
    batch_size: int = 64,
    num_seeds: int = 5,
    num_batches: int = 4,
    case_names: Sequence[str] | None = None,
):
  """Gradient ratios per case, measured group and sparsity.

  Args:
    sparsities: the sparse layers' (mean) sparsities.
    d_model: token width.
    heads: attention heads.
    tokens: tokens per sequence.
    batch_size: sequences per batch.
    num_seeds: initializations (and masks) per sparsity.
    num_batches: Gaussian batches per initialization.
    case_names: a subset of the cases; all by default.

  Returns:
    A list of dicts, one per (case, group, sparsity): ``case``, ``layers``,
    ``unit``, ``s``, the layer ratio ``layer`` (equally sparse neurons), the
    unit slopes ``spread``, ``spread_factor``, ``spread_group``, ``erk``,
    ``erk_factor``, ``erk_group`` (means over seeds), and ``units`` (density, r_u over the seed's geometric mean,
    of every seed's live units on the spread mask), for plotting.
  """
  rows = []
  for case in cases(d_model, heads):
    if case_names is not None and case.name not in case_names:
      continue
    grads = _grads_fn(case.model)
    acc = {}
    for seed in range(num_seeds):
      key = jax.random.PRNGKey(seed)
      x_shape = (batch_size, tokens, d_model)
      params = case.model.init(key, jnp.zeros(x_shape))["params"]
      batches = []
      for b in range(num_batches):
        kx, ky = jax.random.split(jax.random.fold_in(key, 1000 + b))
        x = jax.random.normal(kx, x_shape)
        y = jax.random.randint(ky, x_shape[:2], 0, CLASSES)
        batches.append((x, y, grads(params, x, y)))
      rng = np.random.default_rng(seed)
      for s in sparsities:
        masks = {
            "layer": {
                n: random_mask(rng, params[n]["kernel"].shape, s)
                for n in case.sparse
            },
            "spread": _spread_masks(rng, params, case, s),
            "erk": _erk_masks(jax.random.fold_in(key, 7), params, case, s),
        }
        for kind, mask in masks.items():
          sparse_params = {
              **params,
              **{
                  n: {**params[n], "kernel": params[n]["kernel"] * mask[n]}
                  for n in case.sparse
              },
          }
          totals = {g: 0.0 for g in case.groups}
          for x, y, g_dense in batches:
            g_sparse = grads(sparse_params, x, y)
            for group in case.groups:
              totals[group] = totals[group] + _unit_sums(
                  group, g_sparse, g_dense, mask
              )
          for group, sums in totals.items():
            density, layer = _unit_density(group, mask)
            a = acc.setdefault((group, s), {"units": []})
            if kind == "layer":
              a.setdefault("layer", []).append(sums[0].sum() / sums[3].sum())
              continue
            for suffix, row in (("", 0), ("_factor", 1), ("_group", 2)):
              a.setdefault(f"{kind}{suffix}", []).append(
                  _slope(density, layer, _ratio(sums[row], sums[3]))
              )
            if kind == "spread":
              r = _ratio(sums[0], sums[3])
              live = r > 0
              # Relative to the seed's geometric mean: seeds differ in scale.
              a["units"].append(
                  (density[live], r[live] / np.exp(np.log(r[live]).mean()))
              )
    for group in case.groups:
      for s in sparsities:
        a = acc[group, s]
        units = a.pop("units")
        rows.append(
            {
                "case": case.name,
                "layers": ", ".join(group.layers),
                "unit": "head" if group.unit > 1 else "neuron",
                "s": s,
                **{k: float(np.mean(v)) for k, v in a.items()},
                "units": tuple(np.concatenate(v) for v in zip(*units)),
            }
        )
  return rows


# The keys of `measure`'s rows that hold a ratio or slope, in column order.
MEASURED = (
    "layer",
    "spread",
    "spread_factor",
    "spread_group",
    "erk",
    "erk_factor",
    "erk_group",
)
COLUMNS = (
    "case",
    "layers",
    "unit",
    "sparsity s",
    "1/sqrt(1-s)",
    "layer ratio",
    "unit slope, spread",
    "spread + factor",
    "spread + group factor",
    "unit slope, ERK",
    "ERK + factor",
    "ERK + group factor",
)


def markdown_table(rows) -> str:
  """The ratios and slopes of `measure`, one line per case, group and s."""
  return markdown.table(
      COLUMNS,
      [
          [
              r["case"],
              r["layers"],
              r["unit"],
              r["s"],
              f"{1 / np.sqrt(1 - r['s']):.2f}",
              *(f"{r[k]:.2f}" for k in MEASURED),
          ]
          for r in rows
      ],
  )


def plot(rows, path: str, detail: float = 0.9) -> None:
  """Layer ratio vs s; unit slope vs s; per-unit ratios at ``detail``."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
  series = {}
  for r in rows:
    series.setdefault(f"{r['case']}: {r['layers']}", []).append(r)
  s = np.array(sorted({r["s"] for r in rows}))
  fine = np.linspace(s.min(), s.max(), 200)
  ax.plot(fine, 1 / np.sqrt(1 - fine), "k:", label="1/sqrt(1-s)")
  ax2.axhline(1, color="k", ls=":", lw=1, label="full skew (BatchNorm)")
  ax2.axhline(0, color="gray", ls=":", lw=1)
  ax2.axhline(-1, color="gray", ls=":", lw=1)
  for i, (label, rs) in enumerate(series.items()):
    color = f"C{i}"
    xs = [r["s"] for r in rs]
    marker = "osdv^<>"[i % 7]
    ax.plot(
        xs, [r["layer"] for r in rs], f"{marker}-", color=color, label=label
    )
    ax2.plot(xs, [r["spread"] for r in rs], "o-", color=color, label=label)
    ax2.plot(xs, [r["spread_factor"] for r in rs], "x--", color=color)
    if rs[0]["unit"] == "head":
      ax2.plot(xs, [r["spread_group"] for r in rs], "+:", color=color, ms=9)
  ax.set_yscale("log")
  ax.set_xlabel("sparsity s (every neuron equally sparse)")
  ax.set_ylabel("|g_sparse| / |g_dense| (same weights)")
  ax.set_title("Layer ratio")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  ax2.set_xlabel("mean sparsity s (unit sparsities spread)")
  ax2.set_ylabel("slope of log r_u on log (1-s_u)^-1/2")
  ax2.set_title(
      "Per-unit slope (o: measured, x: paper's factor, +: per-head factor)",
      fontsize=10,
  )
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=8)

  near = min({r["s"] for r in rows}, key=lambda v: abs(v - detail))
  # One normalizer per sigma, for contrast: per-token (post-LN) vs per-head.
  for i, (label, rs) in enumerate(series.items()):
    if not label.startswith(("post_ln", "qk_norm")):
      continue
    (r,) = [r for r in rs if r["s"] == near]
    amp = 1 / np.sqrt(r["units"][0])
    size = 12 if r["unit"] == "head" else 3
    ax3.scatter(
        amp,
        r["units"][1],
        s=size,
        alpha=0.4,
        color=f"C{i}",
        label=label,
        zorder=3 if r["unit"] == "head" else 2,
    )
  line = np.geomspace(*ax3.get_xlim(), 50)
  ax3.plot(line, line / np.sqrt(1 / (1 - near)), "k:", label="slope 1")
  ax3.set_xscale("log")
  ax3.set_yscale("log")
  ax3.set_xlabel("unit amplification (1-s_u)^-1/2")
  ax3.set_ylabel("r_u / geometric mean (per seed)")
  ax3.set_title(f"Per unit, s={near}, unit sparsities spread")
  ax3.grid(alpha=0.3, which="both")
  ax3.legend(fontsize=8, markerscale=3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  start = time.perf_counter()
  rows = measure(
      d_model=FLAGS.d_model,
      batch_size=FLAGS.batch_size,
      num_seeds=FLAGS.num_seeds,
      num_batches=FLAGS.num_batches,
  )
  os.makedirs(FLAGS.out, exist_ok=True)
  table = markdown_table(rows)
  png = os.path.join(FLAGS.out, "grad_ratio_norms.png")
  plot(rows, png)
  setup = (
      f"Gaussian tokens, {FLAGS.batch_size} x 16 x d_model {FLAGS.d_model}, "
      "8 heads, cross-entropy of a random readout to random labels; "
      f"{FLAGS.num_seeds} seeds x {FLAGS.num_batches} batches. Layer ratio: "
      "|g| of the measured layers' active weights, sparse over dense at the "
      "same weights, every neuron equally sparse. Unit slope: least-squares "
      "slope of log r_u on log (1-s_u)^-1/2 over units (neurons; heads for "
      "qk_norm) within each layer (one intercept per layer; units with no "
      "gradient left out), unit sparsities spread over s +- min(s, 1-s)/2 or "
      "ERK "
      "(init_masks); 1 = full per-unit skew, 0 = none. '+ factor': after "
      "sparseopt.diagnostics.fan_in_scale (per neuron). '+ group factor': "
      "the factor of the normalizer's group: per head for qk_norm "
      "(neuron_axis=1 on (d_model, heads, head_dim)), 1 for the others."
  )
  with open(os.path.join(FLAGS.out, "grad_ratio_norms.md"), "w") as f:
    f.write(f"{setup}\n\n{table}\n")
  print(
      f"{setup}\n\n{table}\n\nPlot written to {os.path.abspath(png)} "
      f"({time.perf_counter() - start:.0f}s)"
  )


if __name__ == "__main__":
  flags.DEFINE_string(
      "out", "experiments/results/grad_ratio_norms", "Output folder."
  )
  flags.DEFINE_integer("num_seeds", 5, "Initializations per sparsity.")
  flags.DEFINE_integer("num_batches", 4, "Batches per initialization.")
  flags.DEFINE_integer("batch_size", 64, "Sequences per batch.")
  flags.DEFINE_integer("d_model", 64, "Token width.")
  app.run(main)
