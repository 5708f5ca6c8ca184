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
from gne_jax.models.layers import ConvNet

DEFAULTS = C.family_defaults(depth=32, widths=(16, 32, 64), num_classes=10, normalization="none")


class SerialCNN(ConvNet):
    """Plain CNN with 6n + 2 weight layers (see the module docstring)."""

    depth: int = 32
    widths: tuple[int, ...] = (16, 32, 64)
    norm_spec: C.NormSpec = C.NormSpec()

    def layout(self):
        n = (self.depth - 2) // 6
        stages = [C.Stage("stem", ("stem",), self.conv_layer(self.widths[0]))]
        for s, w in enumerate(self.widths, start=1):
            first = 1
            if s > 1:
                down = self.conv_layer(w, 2)
                stages.append(C.Stage(f"stage{s}_down", (f"stage{s}.layer1",), down))
                first = 2
            names = tuple(f"stage{s}.layer{i}" for i in range(first, 2 * n + 1))
            if names:
                stages.append(C.Stage(f"stage{s}", names, self.conv_layer(w), scanned=True))
        stages.append(self.head_stage())
        return stages


def from_config(cfg: dict) -> SerialCNN:
    return SerialCNN(
        depth=C.check_depth(cfg["depth"]),
        widths=C.check_positive_ints(cfg["widths"], "widths", 3),
        **C.classifier_kwargs(cfg),
    )
