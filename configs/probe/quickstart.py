"""Quickstart: the GNE paper's headline contrast on its 32-layer serial CNN.

Gaussian (Kaiming) vs orthogonal (delta-orthogonal) init × tanh / ReLU / leaky ReLU(0.3)
× no normalization / batch norm, per-block φ and ϕ over 4 initializations. Runs in about
75 s on a 2-core CPU VM, mostly compiling (16×16 inputs keep it quick; the moments of the
conv blocks hardly depend on the image size).

    python -m gne_jax.probe --config configs/probe/quickstart.py --workdir runs/quickstart
"""

import ml_collections
from ml_collections import config_dict

from gne_jax.models import default_config


def get_config():
    c = ml_collections.ConfigDict()
    c.model = default_config("serial_cnn")
    c.model.depth = 32
    c.sweep = ml_collections.ConfigDict()
    c.sweep.init = (
        {"init": "kaiming_normal", "label": "gaussian"},
        {"init": "delta_orthogonal", "label": "orthogonal"},
    )
    c.sweep.activation = (
        {"activation": "tanh", "label": "tanh"},
        {"activation": "relu", "label": "relu"},
        {"activation": "leaky_relu", "negative_slope": 0.3, "label": "leaky_relu(0.3)"},
    )
    c.sweep.normalization = ("none", "batchnorm")
    c.input_shape = (4, 16, 16, 3)
    c.input_scale = 1.0
    c.num_inits = 4
    c.num_probes = 8
    c.method = "hutchinson"
    c.train = True  # batch norm with batch statistics, as at the start of training
    c.seed = 0
    # one init at a time: vmapping conv kernels over inits makes grouped convolutions
    # that XLA compiles several times slower, for no gain in run time on a CPU
    c.init_chunk = 1
    c.block_chunk = config_dict.placeholder(int)
    c.probe_chunk = config_dict.placeholder(int)
    c.plot = True
    return c
