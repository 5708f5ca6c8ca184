"""CIFAR-10, 32-layer plain serial CNN (GNE paper §7.3-7.5; setups §1.3-1.4).

Pick the run with ``init,activation,normalization[,negative_slope]``:

  python -m gne_jax.train --workdir=runs/km_relu \
      --config=configs/train/cifar10_serial.py:kaiming_normal,relu,none
  --config=configs/train/cifar10_serial.py:orthogonal,leaky_relu,none,0.3
  --config=configs/train/cifar10_serial.py:kaiming_normal,relu,smn       (SMN group)
  --config=configs/train/cifar10_serial.py:kaiming_normal,relu,batchnorm (BN baseline)
  --config=configs/train/cifar10_serial.py:orthogonal,selu_depth_aware,none \
      --config.model.selu_epsilon=0.03 --config.model.selu_gamma0=2.0     (SELU group)

130 epochs, SGD momentum 0.9, lr 0.01 ÷10 at epoch 80, batch 128, weight decay
5e-4 on conv/linear weights and biases, clip by value 2.0 on every step.
"""

from gne_jax.models import default_config
from gne_jax.training.config import base_config


def get_config(arg: str = "kaiming_normal,relu,none"):
    parts = arg.split(",")
    init, activation, normalization = parts[:3]
    c = base_config()
    c.dataset.name = "cifar10"
    c.model = default_config("serial_cnn")
    c.model.depth = 32
    c.model.init = init
    c.model.activation = activation
    c.model.normalization = normalization
    if len(parts) > 3:
        c.model.negative_slope = float(parts[3])
    c.num_epochs = 130
    c.optimizer.learning_rate = 0.01
    c.optimizer.lr_boundaries_epochs = (80,)
    if normalization == "weightnorm":  # the original-WN baseline ran 4 epochs in exp_list.py
        c.num_epochs = 4
    return c
