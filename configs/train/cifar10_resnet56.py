"""CIFAR-10 ResNet-56 (GNE paper §7.7; setups §1.3, §1.4, §1.7).

Runs, chosen by the argument:

  bn, bn_mixup                      BatchNorm (+ mixup α = 1)
  smn, smn_mixup                    second-moment normalization with centred convs
  fixup2, fixup2_scalars            Fixup-style p = 2 (m = 2), without / with scalars
  fixup2_scalars_mixup, fixup1.5_scalars_mixup

  python -m gne_jax.train --config=configs/train/cifar10_resnet56.py:smn --workdir=runs/r56_smn

200 epochs, SGD momentum 0.9, lr 0.1 ÷10 at epochs 100 and 150, batch 128, clip
by value 2.0. Weight decay 5e-4 on conv/linear weights and biases, except with
Fixup scalars: 1e-4 on all parameters and the scalars at lr/10.
"""

from gne_jax.models import default_config
from gne_jax.training.config import base_config
from gne_jax.training.optim import FIXUP_SCALAR_PATTERN


def get_config(arg: str = "bn"):
    parts = arg.split("_")
    kind, flags = parts[0], set(parts[1:])
    unknown = flags - {"mixup", "scalars"}
    if unknown or not (kind in ("bn", "smn") or kind.startswith("fixup")):
        raise ValueError(f"cifar10_resnet56 run {arg!r} is unknown; use e.g. bn, bn_mixup, smn, "
                         "smn_mixup, fixup2, fixup2_scalars, fixup2_scalars_mixup, "
                         "fixup1.5_scalars_mixup")
    c = base_config()
    c.dataset.name = "cifar10"
    c.model = default_config("resnet_cifar")
    c.model.depth = 56
    if kind == "bn":
        c.model.normalization = "batchnorm"
    elif kind == "smn":
        c.model.normalization = "smn"
    else:
        c.model.normalization = "none"
        c.model.fixup_p = float(kind[len("fixup"):])
        c.model.fixup_scalars = "scalars" in flags
        if "scalars" in flags:
            c.optimizer.weight_decay = 1e-4
            c.optimizer.weight_decay_mask = "all"
            c.optimizer.scalar_pattern = FIXUP_SCALAR_PATTERN
            c.optimizer.scalar_lr_factor = 0.1
    c.mixup_alpha = 1.0 if "mixup" in flags else 0.0
    c.num_epochs = 200
    c.optimizer.learning_rate = 0.1
    c.optimizer.lr_boundaries_epochs = (100, 150)
    return c
