"""CIFAR-10 DenseNet-BC (GNE paper §7.6; setups §1.3-1.4).

Argument: the normalization (``batchnorm``, ``smn``, ``sws``, ``none``) and
optionally an activation and initializer, e.g. ``none,leaky_relu,orthogonal``:

  python -m gne_jax.train --config=configs/train/cifar10_densenet.py:smn --workdir=runs/dn_smn

130 epochs, SGD momentum 0.9, lr 0.1 ÷10 at epochs 50 and 80, batch 128, clip
by value 2.0, weight decay 5e-4 on conv/linear weights and biases.
"""

from gne_jax.models import default_config
from gne_jax.training.config import base_config


def get_config(arg: str = "batchnorm"):
    parts = arg.split(",")
    c = base_config()
    c.dataset.name = "cifar10"
    c.model = default_config("densenet_bc")
    c.model.normalization = parts[0]
    if len(parts) > 1:
        c.model.activation = parts[1]
    if len(parts) > 2:
        c.model.init = parts[2]
    c.num_epochs = 130
    c.optimizer.learning_rate = 0.1
    c.optimizer.lr_boundaries_epochs = (50, 80)
    return c
