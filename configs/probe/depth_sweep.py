"""φ and ϕ against depth for tanh MLPs: Gaussian vs orthogonal weights.

By the serial theorem the end-to-end ϕ/φ² grows about linearly in depth with Gaussian
weights and stays near the activation term with orthogonal ones (derivations §3, §9).

    python -m gne_jax.probe --config configs/probe/depth_sweep.py --workdir runs/depth
"""

import ml_collections
from ml_collections import config_dict

from gne_jax.models import default_config


def get_config():
    c = ml_collections.ConfigDict()
    c.model = default_config("mlp")
    c.model.width = 256
    c.model.activation = "tanh"
    c.model.num_classes = None
    c.sweep = ml_collections.ConfigDict()
    c.sweep.init = (
        {"init": "kaiming_normal", "gain": 1.0, "label": "gaussian"},
        {"init": "orthogonal", "gain": 1.0, "label": "orthogonal"},
    )
    c.sweep.depth = (4, 8, 16, 32, 64)
    c.input_shape = (4, 256)
    c.input_scale = 0.3
    c.num_inits = 8
    c.num_probes = 32
    c.method = "hutchinson"
    c.train = False
    c.seed = 0
    c.init_chunk = config_dict.placeholder(int)
    c.block_chunk = config_dict.placeholder(int)
    c.probe_chunk = config_dict.placeholder(int)
    c.plot = True
    return c
