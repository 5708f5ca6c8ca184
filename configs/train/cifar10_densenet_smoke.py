"""Smoke variant of ``cifar10_densenet.py``: default model, synthetic 16×16 data, 1 epoch."""

import os

from gne_jax.training.config import from_file, smoke


def get_config(arg: str = "batchnorm"):
    c = from_file(os.path.join(os.path.dirname(__file__), "cifar10_densenet.py"), arg)
    return smoke(c, num_epochs=1, num_train=128)
