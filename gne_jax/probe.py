r"""Command line of the probe job (the logic lives in `gne_jax.probes.job`).

    python -m gne_jax.probe --config configs/probe/quickstart.py --workdir runs/quickstart
    python -m gne_jax.probe --config configs/probe/quickstart.py --workdir runs/q \
        --config.model.depth=20 --config.num_inits=8
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from gne_jax._cache import enable_compilation_cache
from gne_jax._cli import unknown_override
from gne_jax.probes.job import format_table, run_probe


def define_flags() -> None:
    """--config and --workdir (defined on run, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "probe config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for results.csv/json and plots")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    # The job is compile-bound (two XLA programs per variant): keep compiled programs on
    # disk so that re-running a config, or a sweep that shares variants, skips compiling.
    enable_compilation_cache()
    rows = run_probe(flags.FLAGS.config, flags.FLAGS.workdir)
    print(format_table(rows))


def run():
    """Console-script entry point (``gne-probe``)."""
    message = unknown_override(sys.argv)
    if message is not None:
        raise SystemExit(f"error: {message}")
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
