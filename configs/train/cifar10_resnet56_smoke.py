"""Smoke variant of ``cifar10_resnet56.py``: ResNet-8, synthetic 16×16 data, 2 epochs.

  python -m gne_jax.train --config=configs/train/cifar10_resnet56_smoke.py:smn --workdir=/tmp/r
"""

import os

from gne_jax.training.config import from_file, smoke


def get_config(arg: str = "bn"):
    c = from_file(os.path.join(os.path.dirname(__file__), "cifar10_resnet56.py"), arg)
    c.model.depth = 8
    c.model.widths = (8, 16, 16)
    c.optimizer.learning_rate = 0.05
    return smoke(c)
