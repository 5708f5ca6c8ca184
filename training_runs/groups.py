"""The training experiment groups: which configs each runs, at paper size and small.

A run is ``(label, config file, config argument, overrides)``. ``paper`` keeps the
config file's settings (setups §1.4: 32-layer CNN, 130/200 epochs, CIFAR-10, batch 128);
``small`` shrinks every run to minutes on a CPU on a small real dataset given as an
``.npz`` or image folder: an 8-layer serial CNN / ResNet-8 / 2-block DenseNet, 16×16
images, batch 64, ``SMALL_EPOCHS`` epochs with the learning-rate drops at 60% and 80%;
ImageNet's ResNet-50 becomes a bottleneck ResNet-14 of width 8 on 32×32 images.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import ml_collections

from gne_jax.training.config import from_file

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "configs", "train")
SMALL_EPOCHS = 15


class Run(NamedTuple):
    label: str
    config_file: str
    arg: str | None
    overrides: dict = {}


SERIAL = "cifar10_serial.py"
GROUPS: dict[str, list[Run]] = {
    # GNE paper §7.3: initialization of the plain serial CNN (setups §1.4).
    "initialization": [
        Run("BN ReLU", SERIAL, "kaiming_normal,relu,batchnorm"),
        Run("KM ReLU", SERIAL, "kaiming_normal,relu,none"),
        Run("Orth ReLU", SERIAL, "orthogonal,relu,none"),
        Run("Delta Orth ReLU", SERIAL, "delta_orthogonal,relu,none"),
        Run("KM tanh", SERIAL, "kaiming_normal,tanh,none"),
        Run("Orth tanh", SERIAL, "orthogonal,tanh,none"),
        Run("Orth leaky ReLU 0.3", SERIAL, "orthogonal,leaky_relu,none,0.3"),
    ],
    # §7.4: normalization (all Kaiming + ReLU).
    "normalization": [
        Run("BN", SERIAL, "kaiming_normal,relu,batchnorm"),
        Run("SMN", SERIAL, "kaiming_normal,relu,smn"),
        Run("sWS", SERIAL, "kaiming_normal,relu,sws"),
        Run("L1-MN", SERIAL, "kaiming_normal,relu,smn_l1"),
    ],
    # §7.5: self-normalizing networks.
    "selu": [
        Run("KM SELU", SERIAL, "kaiming_normal,selu,none"),
        Run("Orth SELU", SERIAL, "orthogonal,selu,none"),
        Run("Orth sSELU eps=0.03 g=1", SERIAL, "orthogonal,selu_depth_aware,none",
            {"model.selu_epsilon": 0.03, "model.selu_gamma0": 1.0}),
        Run("Orth sSELU eps=0.03 g=2", SERIAL, "orthogonal,selu_depth_aware,none",
            {"model.selu_epsilon": 0.03, "model.selu_gamma0": 2.0}),
    ],
    # §7.6: DenseNet.
    "densenet": [
        Run("BN", "cifar10_densenet.py", "batchnorm"),
        Run("SMN", "cifar10_densenet.py", "smn"),
        Run("KM ReLU", "cifar10_densenet.py", "none,relu,kaiming_normal"),
    ],
    # §7.7: ResNet-56.
    "resnet56": [
        Run("BN", "cifar10_resnet56.py", "bn"),
        Run("BN + mixup", "cifar10_resnet56.py", "bn_mixup"),
        Run("SMN", "cifar10_resnet56.py", "smn"),
        Run("Fixup@2 + scale", "cifar10_resnet56.py", "fixup2_scalars"),
    ],
    # ResNet-50 on ImageNet (setups §1.8): BN and SMN, each without and with mixup
    # (α = 0.2; the paper's SMN run is "SMN + mixup").
    "imagenet": [
        Run("BN", "imagenet_resnet50.py", "bn"),
        Run("BN + mixup", "imagenet_resnet50.py", "bn_mixup"),
        Run("SMN", "imagenet_resnet50.py", "smn"),
        Run("SMN + mixup", "imagenet_resnet50.py", "smn_mixup"),
    ],
    # Vanishing-curvature paper: SGD vs Adam on a deep randomly initialized plain network,
    # and with BN or residual connections (qualitative: setups §4).
    "sgd_adam": [
        Run("plain SGD", SERIAL, "kaiming_normal,relu,none"),
        Run("plain Adam", SERIAL, "kaiming_normal,relu,none", {"optimizer.name": "adam"}),
        Run("BN SGD", SERIAL, "kaiming_normal,relu,batchnorm"),
        Run("BN Adam", SERIAL, "kaiming_normal,relu,batchnorm", {"optimizer.name": "adam"}),
    ],
}

# What a full run costs (the paper's sizes), for the docs.
PAPER_COST = {
    "initialization": "16 runs × 130 epochs of a 32-layer CNN on CIFAR-10, × repeats",
    "normalization": "4 runs × 130 epochs, × repeats",
    "selu": "8 runs × 130 epochs, × repeats",
    "densenet": "6 runs × 130 epochs of DenseNet-BC, × repeats",
    "resnet56": "8 runs × 200 epochs of ResNet-56, × repeats",
    "imagenet": "4 runs × 90 epochs of ResNet-50 on ImageNet (1.28 M images, batch 256): "
                "115 M images per run, about a day per run on one GPU",
    "sgd_adam": "4 runs (deep plain / BN CNN) × 130 epochs",
}


def _set(c, key, value):
    node = c
    *parents, last = key.split(".")
    for p in parents:
        node = node[p]
    node[last] = value


def run_config(group: str, run: Run, *, size: str, dataset: str | None,
               seed: int, data_dir: str | None = None) -> ml_collections.ConfigDict:
    """The config of one run of ``group`` at ``size`` (``small`` or ``paper``), seed ``seed``;
    ``data_dir``: where the TFDS datasets are prepared (e.g. ImageNet at paper size)."""
    c = from_file(os.path.join(CONFIGS, run.config_file), run.arg)
    for k, v in run.overrides.items():
        _set(c, k, v)
    if group == "sgd_adam":
        c.model.depth = 20 if size == "small" else 56
        c.optimizer.clip = "none"
        c.optimizer.weight_decay = 0.0
        if c.optimizer.name == "adam":
            c.optimizer.learning_rate = 1e-3
    c.seed = seed
    if data_dir:
        c.dataset.data_dir = data_dir
    if dataset:
        if os.path.isdir(dataset):
            c.dataset.name, c.dataset.path = "image_folder", dataset
        elif dataset.endswith(".npz"):
            c.dataset.name, c.dataset.path = "npz", dataset
        else:  # a TFDS dataset prepared on disk
            c.dataset.name = dataset
    if size == "small":
        c.dataset.image_size = 16
        c.dataset.channels = 1 if c.dataset.name == "npz" else 3
        c.batch_size = 64
        c.eval_batch_size = 120
        c.num_epochs = SMALL_EPOCHS
        c.optimizer.lr_boundaries_epochs = (int(0.6 * SMALL_EPOCHS), int(0.8 * SMALL_EPOCHS))
        c.log_every_steps = 10
        c.checkpoint_every_steps = 0
        c.grad_norm_epochs = 3
        c.progress_bar = False
        c.tensorboard = False
        name = c.model.name
        if name == "serial_cnn" and group != "sgd_adam":
            c.model.depth = 8
            c.model.widths = (16, 32, 32)
        elif name == "serial_cnn":
            c.model.widths = (16, 32, 32)
        elif name == "resnet_cifar":
            c.model.depth = 8
            c.model.widths = (16, 32, 32)
        elif name == "densenet_bc":
            c.model.block_sizes = (2, 2, 2)
            c.model.growth_rate = 8
        elif name == "resnet50":
            # Bottleneck ResNet-14 (one block per stage), width 8: 32×32 inputs, as the
            # stem and stages downsample 32× (the digits are upsampled 4×).
            c.model.stage_sizes = (1, 1, 1, 1)
            c.model.width = 8
            c.dataset.image_size = 32
            c.loader_workers = 0  # the ImageNet config's 8 decoding workers, not needed here
    return c
