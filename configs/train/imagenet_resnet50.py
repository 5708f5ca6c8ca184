"""ImageNet ResNet-50, BatchNorm vs SMN (setups §1.8).

Arguments: ``bn``, ``bn_mixup``, ``smn_mixup`` (the paper's SMN run), ``smn``.
Needs ``imagenet2012`` prepared as array_record from the manual download:

  tfds build imagenet2012 --file_format=array_record --manual_dir=<tars> --data_dir=<dir>
  python -m gne_jax.train --config=configs/train/imagenet_resnet50.py:smn_mixup \
      --config.dataset.data_dir=<dir> --workdir=runs/r50_smn

90 epochs, batch 256, SGD momentum 0.9, lr 0.1 ÷10 every 30 epochs, weight decay
1e-4 on conv/fc kernels only, mixup α = 0.2, no gradient clipping.
"""

from gne_jax.models import default_config
from gne_jax.training.config import base_config


def get_config(arg: str = "bn"):
    kind, _, extra = arg.partition("_")
    if kind not in ("bn", "smn") or extra not in ("", "mixup"):
        raise ValueError(f"imagenet_resnet50 run {arg!r} is unknown; use bn, bn_mixup, smn or "
                         "smn_mixup")
    c = base_config()
    c.dataset.name = "imagenet2012"
    c.model = default_config("resnet50")
    c.model.normalization = "batchnorm" if kind == "bn" else "smn"
    c.mixup_alpha = 0.2 if extra == "mixup" else 0.0
    c.batch_size = 256
    c.eval_batch_size = 256
    c.num_epochs = 90
    c.optimizer.learning_rate = 0.1
    c.optimizer.lr_boundaries_epochs = (30, 60)
    c.optimizer.weight_decay = 1e-4
    c.optimizer.weight_decay_mask = "kernels"
    c.optimizer.clip = "none"
    c.log_every_steps = 200
    c.checkpoint_every_steps = 5000
    c.grad_norm_epochs = 1
    c.loader_workers = 8  # JPEG decode + random-resized crops in 8 worker processes
    return c
