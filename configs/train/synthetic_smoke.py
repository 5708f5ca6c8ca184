"""Offline smoke run: 8-layer serial CNN with BN on the synthetic dataset, 2 epochs.

  python -m gne_jax.train --config=configs/train/synthetic_smoke.py --workdir=/tmp/smoke
"""

import os

from gne_jax.training.config import from_file


def get_config():
    return from_file(os.path.join(os.path.dirname(__file__), "cifar10_serial_smoke.py"))
