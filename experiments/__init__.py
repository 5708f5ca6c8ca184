"""The papers' claims at initialization, reproduced: ``python -m experiments``.

Every check of the master list (``experiments.master.MASTER``) is implemented by a module in
``experiments.checks`` that registers it with ``experiments.registry.check``; the command
line (``experiments.cli``) runs them, writes one CSV (and PNG) per check and a report with a
verdict per claim. See docs/reproductions.md.
"""
