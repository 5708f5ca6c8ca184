"""Command-line flags of ``python -m gne_jax.train`` (kept apart so importing
``gne_jax.train`` from a notebook defines no flags)."""

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
flags.DEFINE_bool("jax_distributed", False,
                  "Call jax.distributed.initialize() first (multi-host runs).")
config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (configs/train/*.py).", lock_config=True)


def mark_required():
    flags.mark_flags_as_required(["config", "workdir"])
