"""Research diagnostics: gradient skew, neuron turning, topology statistics.

Measurements for studying sparse training rather than for doing it, kept out
of the top-level namespace so that the user API stays small. Every
``*_diagnostics`` function returns a flat ``{name: scalar}`` dict of device
arrays, so a jitted train step can return it without a host sync and a
logger can fetch it every N steps. The factor functions (``fan_in_scale``,
``norm_scale``, ``batch_stats_scale``, ``sparseopt_scales``) expose the
per-neuron factors that :func:`sparseopt_jax.scale_by_sparseopt` applies,
for inspection.

Use as::

  import sparseopt_jax as sparseopt
  metrics = sparseopt.diagnostics.dst_diagnostics(opt_state)
"""

from sparseopt_jax._src.diagnostics import dst_diagnostics
from sparseopt_jax._src.diagnostics import fan_in_histogram
from sparseopt_jax._src.diagnostics import mask_update_jump
from sparseopt_jax._src.diagnostics import neuron_turning
from sparseopt_jax._src.diagnostics import skew_diagnostics
from sparseopt_jax._src.diagnostics import turning_diagnostics
from sparseopt_jax._src.transform import batch_stats_scale
from sparseopt_jax._src.transform import fan_in_scale
from sparseopt_jax._src.transform import norm_scale
from sparseopt_jax._src.transform import sparseopt_scales

__all__ = (
    "batch_stats_scale",
    "dst_diagnostics",
    "fan_in_histogram",
    "fan_in_scale",
    "mask_update_jump",
    "neuron_turning",
    "norm_scale",
    "skew_diagnostics",
    "sparseopt_scales",
    "turning_diagnostics",
)
