"""A seconds-long probe run for tests and a first look: tiny serial CNN, two inits.

    python -m gne_jax.probe --config configs/probe/smoke.py --workdir /tmp/probe_smoke
"""

import ml_collections
from ml_collections import config_dict

from gne_jax.models import default_config


def get_config():
    c = ml_collections.ConfigDict()
    c.model = default_config("serial_cnn")
    c.model.depth = 8
    c.model.widths = (4, 4, 4)
    c.sweep = ml_collections.ConfigDict()
    c.sweep.init = (
        {"init": "kaiming_normal", "label": "gaussian"},
        {"init": "delta_orthogonal", "label": "orthogonal"},
    )
    c.sweep.normalization = ("batchnorm",)
    c.input_shape = (2, 8, 8, 3)
    c.input_scale = 1.0
    c.num_inits = 2
    c.num_probes = 4
    c.method = "hutchinson"
    c.train = True
    c.seed = 0
    c.init_chunk = 1
    c.block_chunk = config_dict.placeholder(int)
    c.probe_chunk = config_dict.placeholder(int)
    c.plot = True
    return c
