"""The GNE paper's serial (plain) CNN for CIFAR (setups §1.3).

conv3×3 (3→16) + act; three stages of 2n conv3×3 layers with widths 16/32/64,
stride 2 at the first conv of stages 2 and 3; global average pooling (avg-pool 8
at 32×32) and a linear layer. depth = 6n + 2 weight layers (20/32/44/56, and
8/14 for the normalization variants); no shortcuts. Each layer is
conv → norm → act, with a conv bias only when there is no normalization layer.

Blocks: ``stem``; ``stage1.layer1..2n`` (one scanned group);
``stage{s}.layer1`` (stride 2, one block) and ``stage{s}.layer2..2n`` (scanned)
for s = 2, 3; ``head``.
"""

from __future__ import annotations

from gne_jax.models import common as C
from gne_jax.models.layers import Head, conv_layer_factory

DEFAULTS = {
    "depth": 32,
    "widths": (16, 32, 64),
    "num_classes": 10,
    **C.ACTIVATION_DEFAULTS,
    "init": "kaiming_normal",
    "gain": None,
    "normalization": "none",
    "head_init": "kaiming_normal",
    "head_gain": 1.0,
    "dtype": None,
}
NORMALIZATIONS = ("none", "batchnorm", "smn", "smn_l1", "sws", "weightnorm", "meanonly")


class SerialCNN(C.BlockModel):
    """Plain CNN with 6n + 2 weight layers (see the module docstring)."""

    depth: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    num_classes: int = 10
    act_spec: C.ActivationSpec = C.ActivationSpec()
    init_name: str = "kaiming_normal"
    gain: float = 2.0**0.5
    norm_spec: C.NormSpec = C.NormSpec()
    head_init: str = "kaiming_normal"
    head_gain: float = 1.0

    def check_input(self, x):
        C.check_input(x, 4, "SerialCNN (NHWC images)")

    def _layer(self, features, strides=1):
        return conv_layer_factory(self, features, strides)

    def layout(self):
        n = (self.depth - 2) // 6
        stages = [C.Stage("stem", ("stem",), self._layer(self.widths[0]))]
        for s, w in enumerate(self.widths, start=1):
            first = 1
            if s > 1:
                stages.append(C.Stage(f"stage{s}_down", (f"stage{s}.layer1",), self._layer(w, 2)))
                first = 2
            names = tuple(f"stage{s}.layer{i}" for i in range(first, 2 * n + 1))
            if names:
                stages.append(C.Stage(f"stage{s}", names, self._layer(w), scanned=True))
        head = lambda train, **kw: Head(  # noqa: E731
            self.num_classes, self.norm_spec, self.head_init, self.head_gain, train=train, **kw
        )
        stages.append(C.Stage("head", ("head",), head))
        return stages


def check_depth(depth, key="depth", minimum=8):
    depth = C.check_positive_int(depth, key)
    if depth < minimum or (depth - 2) % 6:
        raise ValueError(
            f"Config `{key}` must be 6n + 2 with n >= {(minimum - 2) // 6} "
            f"(e.g. 8, 14, 20, 32, 44, 56, 110); got {depth}."
        )
    return depth


def from_config(cfg: dict) -> SerialCNN:
    act = C.activation_spec(cfg)
    return SerialCNN(
        depth=check_depth(cfg["depth"]),
        widths=C.check_positive_ints(cfg["widths"], "widths", 3),
        num_classes=C.check_positive_int(cfg["num_classes"], "num_classes"),
        act_spec=act,
        init_name=C.check_init(cfg["init"]),
        gain=C.resolve_gain(cfg, act),
        norm_spec=C.norm_spec(cfg, NORMALIZATIONS),
        head_init=C.check_init(cfg["head_init"], "head_init", conv=False),
        head_gain=C.check_float(cfg["head_gain"], "head_gain", positive=True),
    )
