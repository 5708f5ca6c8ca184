"""Layers the theory prescribes: initializers, activations and normalization layers.

* `initializers`: orthogonal, delta-orthogonal, scaled Gaussian/Kaiming with activation gains;
* `activations`: the activation zoo, PReLU/sPReLU, depth-aware SELU, shaped activations;
* `normalization`: second moment normalization, scaled weight standardization, weight norm,
  mean-only and centred layers.
"""
