"""Model zoo of the GNE paper, built from configs and exposing their block structure.

``create_model(config)`` builds a Flax Linen module from a config (a dict or an
``ml_collections.ConfigDict``) whose ``name`` is one of ``MODEL_NAMES``;
``default_config(name)`` returns every key of that family with its default.
Every model supports ``model.init(key, x, train=False)``,
``model.apply(variables, x, train=...)`` (``mutable=['batch_stats']`` in training
mode) and ``model.blocks(variables, x, train=...) -> list[BlockGroup]`` with
``compose_blocks(model.blocks(variables, x, train=t), x) == model.apply(...)``.
See ``docs/models.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from gne_jax.models import common
from gne_jax.models import densenet as _densenet
from gne_jax.models import mlp as _mlp
from gne_jax.models import mobilenet as _mobilenet
from gne_jax.models import resnet50 as _resnet50
from gne_jax.models import resnet_cifar as _resnet_cifar
from gne_jax.models import serial_cnn as _serial_cnn
from gne_jax.models.common import NORMALIZATIONS, BlockModel
from gne_jax.models.densenet import DenseNetBC
from gne_jax.models.mlp import MLP
from gne_jax.models.mobilenet import ConvMobileNet
from gne_jax.models.resnet50 import ResNet50
from gne_jax.models.resnet_cifar import ResNetCIFAR
from gne_jax.models.serial_cnn import SerialCNN

_FAMILIES = {
    "mlp": _mlp,
    "serial_cnn": _serial_cnn,
    "resnet_cifar": _resnet_cifar,
    "resnet50": _resnet50,
    "densenet_bc": _densenet,
    "conv_mobilenet": _mobilenet,
}
MODEL_NAMES = tuple(_FAMILIES)


def _family(name):
    if name not in _FAMILIES:
        raise ValueError(f"Unknown model name {name!r}; valid: {list(MODEL_NAMES)}.")
    return _FAMILIES[name]


def default_config(name: str) -> ml_collections.ConfigDict:
    """All config keys of model family ``name`` with their defaults (a fresh ConfigDict)."""
    return common.to_config_dict(name, _family(name).DEFAULTS)


def create_model(config: Mapping[str, Any] | ml_collections.ConfigDict) -> BlockModel:
    """The Flax module described by ``config`` (``name`` plus any keys of its family).

    Missing keys take the family defaults; unknown names, keys and option values
    raise ``ValueError`` listing the valid choices.
    """
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"config must be a mapping with a `name` in {list(MODEL_NAMES)}.")
    fam = _family(config["name"])
    merged = common.merge_config(config["name"], fam.DEFAULTS, config)
    return fam.from_config(merged)


__all__ = [
    "MODEL_NAMES",
    "NORMALIZATIONS",
    "BlockModel",
    "ConvMobileNet",
    "DenseNetBC",
    "MLP",
    "ResNet50",
    "ResNetCIFAR",
    "SerialCNN",
    "create_model",
    "default_config",
]
