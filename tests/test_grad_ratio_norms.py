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
  keys = ("layer", "spread", "spread_factor", "erk", "erk_factor")
  assert all(np.isfinite(r[k]) for r in rows for k in keys)
  post_ln, qk_norm = rows
  # Post-LN: one sigma per token, so the layer is amplified by about
  # 1/sqrt(1 - 0.9) = 3.16 but its neurons are not skewed against each other;
  # the per-neuron factor then creates a skew of slope about -1.
  assert post_ln["layer"] > 2
  assert abs(post_ln["spread"]) < 0.5 and post_ln["spread_factor"] < -0.5
  # QK-norm: one sigma per head, so heads are skewed by their own sparsity.
  assert qk_norm["spread"] > 0.5
  table = grad_ratio_norms.markdown_table(rows)
  assert table.splitlines()[0] == (
      "| " + " | ".join(grad_ratio_norms.COLUMNS) + " |"
  )
  assert "| post_ln | dense | neuron | 0.9 | 3.16 |" in table
  grad_ratio_norms.plot(rows, str(tmp_path / "plot.png"))
  assert (tmp_path / "plot.png").stat().st_size > 0
