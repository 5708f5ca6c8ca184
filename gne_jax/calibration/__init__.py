"""Calibrating a network's blocks to Block Dynamical Isometry, and the baselines.

* ``calibrate``: per block, one scalar on a knob (kernel or branch scale) so that the
  measured φ of the block equals the target (``core.py``);
* ``lsuv``: Mishkin & Matas (2016), orthonormal init then per-layer output variance 1;
* ``orthogonal_gain``: the GNE paper's recipe, orthogonal weights times the activation gain;
* ``CalibrationReport``/``plot_calibration``: the per-block record and its figure.

See ``docs/calibration.md``.
"""

from gne_jax.calibration.core import Options, calibrate, calibrate_groups, knob_of
from gne_jax.calibration.knobs import KNOBS, scale_leaves
from gne_jax.calibration.lsuv import LSUVReport, lsuv
from gne_jax.calibration.recipes import orthogonal_gain, orthogonal_gain_config
from gne_jax.calibration.report import CalibrationReport, plot_calibration

__all__ = [
    "CalibrationReport", "KNOBS", "LSUVReport", "Options", "calibrate", "calibrate_groups",
    "knob_of", "lsuv", "orthogonal_gain", "orthogonal_gain_config", "plot_calibration",
    "scale_leaves",
]
