"""Conv-MobileNet V1 of the GNE paper's ImageNet runs (setups §1.8).

MobileNet V1 with every depthwise-separable block replaced by one dense 3×3
conv: conv(3 → 32, stride 2), then 13 conv3×3 with widths 64, 128, 128, 256,
256, 512 × 6, 1024, 1024 and MobileNet's strides, global average pooling (avg-pool
7 at 224×224) and fc 1024 → 1000: 15 weight layers. Each conv is
conv → norm → act, with a conv bias only without a normalization layer.
``width_multiplier`` scales every width (for cheap tests).

Blocks: ``stem``, ``layer1 … layer13``, ``head``; consecutive layers with the same
width and stride 1 (``layer7 … layer11``, 512 → 512) form one scanned group.
"""

from __future__ import annotations

from gne_jax.models import common as C
from gne_jax.models.layers import ConvNet

DEFAULTS = C.family_defaults(
    stem_width=32,
    widths=(64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024),
    strides=(1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1),
    width_multiplier=1.0,
    num_classes=1000,
    normalization="batchnorm",
)


class ConvMobileNet(ConvNet):
    """Conv-MobileNet V1 (see the module docstring)."""

    stem_width: int = 32
    widths: tuple[int, ...] = DEFAULTS["widths"]
    strides: tuple[int, ...] = DEFAULTS["strides"]
    num_classes: int = 1000

    def layout(self):
        stages = [C.Stage("stem", ("stem",), self.conv_layer(self.stem_width, 2))]
        c_in, i, n = self.stem_width, 0, len(self.widths)
        while i < n:
            w, s = self.widths[i], self.strides[i]
            j = i + 1
            if s == 1 and c_in == w:  # a run of identical layers: one scanned group
                while j < n and self.widths[j] == w and self.strides[j] == 1:
                    j += 1
            names = tuple(f"layer{k + 1}" for k in range(i, j))
            if len(names) > 1:
                stages.append(
                    C.Stage(f"layers{i + 1}_{j}", names, self.conv_layer(w), scanned=True)
                )
            else:
                stages.append(C.Stage(f"layer{i + 1}", names, self.conv_layer(w, s)))
            c_in, i = w, j
        stages.append(self.head_stage())
        return stages


def from_config(cfg: dict) -> ConvMobileNet:
    widths = C.check_positive_ints(cfg["widths"], "widths")
    strides = C.check_positive_ints(cfg["strides"], "strides", len(widths))
    mult = C.check_float(cfg["width_multiplier"], "width_multiplier", positive=True)
    scale = lambda w: max(1, int(round(w * mult)))  # noqa: E731
    return ConvMobileNet(
        stem_width=scale(C.check_positive_int(cfg["stem_width"], "stem_width")),
        widths=tuple(scale(w) for w in widths),
        strides=strides,
        **C.classifier_kwargs(cfg),
    )
