"""Smoke variant of ``cifar10_serial.py``: 8 layers, synthetic 16×16 data, 2 epochs.

  python -m gne_jax.train --workdir=/tmp/serial_smoke \
      --config=configs/train/cifar10_serial_smoke.py:kaiming_normal,relu,smn
"""

import os

from gne_jax.training.config import from_file, smoke


def get_config(arg: str = "kaiming_normal,relu,batchnorm"):
    c = from_file(os.path.join(os.path.dirname(__file__), "cifar10_serial.py"), arg)
    c.model.depth = 8
    c.model.widths = (8, 16, 16)
    c.optimizer.learning_rate = 0.05
    return smoke(c)
