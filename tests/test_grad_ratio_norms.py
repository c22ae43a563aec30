"""A tiny run of the grad-ratio reproduction for other normalizers."""

import numpy as np

from experiments import grad_ratio_norms


def test_grad_ratio_norms_tiny(tmp_path):
  rows = grad_ratio_norms.measure(
      sparsities=(0.9,),
      d_model=32,
      tokens=8,
      batch_size=16,
      num_seeds=1,
      num_batches=2,
      case_names=("post_ln", "qk_norm"),
  )
  assert [(r["case"], r["unit"]) for r in rows] == [
      ("post_ln", "neuron"),
      ("qk_norm", "head"),
  ]
  assert all(np.isfinite(r[k]) for r in rows for k in grad_ratio_norms.MEASURED)
  post_ln, qk_norm = rows
  # Post-LN: one sigma per token, so the layer is amplified by about
  # 1/sqrt(1 - 0.9) = 3.16 but its neurons are not skewed against each other;
  # the per-neuron factor then creates a skew of slope about -1.
  assert post_ln["layer"] > 2
  assert abs(post_ln["spread"]) < 0.5 and post_ln["spread_factor"] < -0.5
  # The group factor follows the normalizer: none for post-LN (slope kept)...
  assert post_ln["spread_group"] == post_ln["spread"]
  assert post_ln["erk_group"] == post_ln["erk"]
  # QK-norm: one sigma per head, so heads are skewed by their own sparsity;
  # the per-head factor removes it.
  assert qk_norm["spread"] > 0.5
  assert abs(qk_norm["spread_group"]) < 0.5
  table = grad_ratio_norms.markdown_table(rows)
  assert table.splitlines()[0] == (
      "| " + " | ".join(grad_ratio_norms.COLUMNS) + " |"
  )
  assert "| post_ln | dense | neuron | 0.9 | 3.16 |" in table
  grad_ratio_norms.plot(rows, str(tmp_path / "plot.png"))
  assert (tmp_path / "plot.png").stat().st_size > 0


def test_group_factor_is_per_head():
  rng = np.random.default_rng(0)
  mask = np.zeros((8, 6), bool)  # 3 heads of 2 columns.
  for h, keep in enumerate((16, 8, 4)):
    flat = np.zeros(16, bool)
    flat[rng.choice(16, keep, replace=False)] = True
    mask[:, 2 * h : 2 * h + 2] = flat.reshape(8, 2)
  density = np.array([1.0, 0.5, 0.25])
  expected = np.repeat(np.sqrt(density / density.mean()), 2)
  np.testing.assert_allclose(
      grad_ratio_norms.group_factor(mask, 2), expected, rtol=1e-6
  )
  np.testing.assert_array_equal(grad_ratio_norms.group_factor(mask, 1), 1.0)
