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
from gne_jax._cli import config_error
from gne_jax.probes.job import format_table, run_probe, swept_fields


def define_flags() -> None:
    """--config and --workdir (defined on run, so importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "probe config file", lock_config=True)
    flags.DEFINE_string("workdir", None, "directory for results.csv/json and plots")
    flags.mark_flags_as_required(["config", "workdir"])


def swept_override(argv: list[str], config) -> str | None:
    """A message when ``argv`` overrides a model field that a sweep axis sets: the sweep
    would replace the value in every variant, so the override would be silently lost."""
    axes = config.sweep.to_dict() if config.sweep is not None else {}
    for a in argv:
        if not a.startswith("--config.model."):
            continue
        field = a[len("--config.model."):].split("=", 1)[0]
        setters = [name for name, values in axes.items()
                   if field in swept_fields({name: values})]
        if setters:
            return (f"--config.model.{field}: the sweep axis {setters[0]!r} sets `{field}` in "
                    f"every variant, which would replace this value. Change the axis instead, "
                    f"e.g. --config.sweep.{setters[0]}=\"({axes[setters[0]][0]!r},)\".")
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    message = swept_override(sys.argv, flags.FLAGS.config)
    if message is not None:
        raise SystemExit(f"error: {message}")
    # The job is compile-bound (two XLA programs per variant): keep compiled programs on
    # disk so that re-running a config, or a sweep that shares variants, skips compiling.
    enable_compilation_cache()
    try:
        rows = run_probe(flags.FLAGS.config, flags.FLAGS.workdir)
    except (ValueError, TypeError, PermissionError) as err:  # a bad value: one line, no trace
        raise SystemExit(f"error: {err}") from None
    print(format_table(rows))


def run():
    """Console-script entry point (``gne-probe``)."""
    message = config_error(sys.argv)
    if message is not None:
        raise SystemExit(f"error: {message}")
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
