r"""Command line of the training loop (the loop lives in `gne_jax.training.train`).

    python -m gne_jax.train --config configs/train/synthetic_smoke.py --workdir runs/smoke
    python -m gne_jax.train --config configs/train/cifar10_resnet56.py:smn --workdir runs/r56 \
        --config.num_epochs=10
"""

from __future__ import annotations

import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gne_jax._cache import enable_compilation_cache
from gne_jax._cli import config_error
from gne_jax.training import input_pipeline
from gne_jax.training.checkpoint import NonFiniteError
from gne_jax.training.train import train_and_evaluate

FLAGS = flags.FLAGS


def define_flags() -> None:
    """--config, --workdir, --jax_distributed (defined on run, so importing defines none)."""
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")
    flags.DEFINE_bool("jax_distributed", False,
                      "Call jax.distributed.initialize() first (multi-host runs).")
    config_flags.DEFINE_config_file(
        "config", None, "Training configuration file (configs/train/*.py).", lock_config=True)
    flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(pylogging.Filter):
    """Keeps Orbax's per-save INFO lines out of the console (warnings still pass)."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.get_absl_handler().addFilter(_QuietOrbax())
    cache = enable_compilation_cache()
    if cache:
        logging.info("Persistent compilation cache: %s", cache)
    if FLAGS.jax_distributed:
        jax.distributed.initialize()
    logging.info("JAX process %d/%d, local devices %s", jax.process_index(),
                 jax.process_count(), jax.local_devices())
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (NonFiniteError, input_pipeline.DatasetNotPreparedError, FileExistsError,
            ValueError) as err:
        logging.error("%s", err)
        raise SystemExit(f"error: {err}") from None


def run():
    """Console-script entry point (``gne-train``)."""
    define_flags()
    message = config_error(sys.argv)
    if message is not None:
        raise SystemExit(f"error: {message}")
    app.run(main)


if __name__ == "__main__":
    run()
