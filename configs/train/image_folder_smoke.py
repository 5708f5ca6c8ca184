"""A small serial CNN on your own image folder, minutes on a CPU.

  python -m gne_jax.train --config=configs/train/image_folder_smoke.py:DIR --workdir=runs/mine

``DIR`` holds ``train/<class>/*.png|jpg`` and ``test/<class>/...`` (any image size: every
image is fitted to 32×32, RGB). The classes are the sub-folders of ``train/``; the
per-channel mean and std come from the training images. 8-layer serial CNN with batch
norm, widths 16/32/32, SGD lr 0.05 with momentum, 10 epochs (lr ÷10 at 6 and 8), batch
64, pad-crop + flip. A checkpoint every 100 steps and at the end; a larger
``--config.num_epochs`` in the same workdir extends the run.
"""

from gne_jax.models import default_config
from gne_jax.training.config import base_config


def get_config(path: str = ""):
    c = base_config()
    c.dataset.name = "image_folder"
    c.dataset.path = path
    c.dataset.image_size = 32
    c.dataset.channels = 3
    c.model = default_config("serial_cnn")
    c.model.depth = 8
    c.model.widths = (16, 32, 32)
    c.model.normalization = "batchnorm"
    c.batch_size = 64
    c.eval_batch_size = 100
    c.num_epochs = 10
    c.optimizer.learning_rate = 0.05
    c.optimizer.lr_boundaries_epochs = (6, 8)
    c.log_every_steps = 10
    c.checkpoint_every_steps = 100
    c.grad_norm_epochs = 1
    return c
