"""Smoke variant of ``imagenet_resnet50.py``: synthetic 32×32 data, 10 classes, 1 epoch."""

import os

from gne_jax.training.config import from_file, smoke


def get_config(arg: str = "bn"):
    c = from_file(os.path.join(os.path.dirname(__file__), "imagenet_resnet50.py"), arg)
    return smoke(c, image_size=32, num_train=64, num_eval=32, batch_size=16, num_epochs=1)
