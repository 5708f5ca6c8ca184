"""Optimizers and learning-rate schedules for training, built from optax pieces.

The update of one step is the chain the GNE paper's PyTorch code applies
(setups §1.2):

    g  <- clip(g)                                  (by value, e.g. 2.0, or by global norm)
    g  <- g + wd * mask * θ                        (weight decay, coupled as in torch SGD)
    b  <- μ b + g ;  d = b  (or g + μ b, Nesterov) (optax.trace)
    θ  <- θ - lr(t) * d

Adam replaces the momentum line by ``optax.scale_by_adam``. Parameters labelled as
Fixup scalars (biases and multipliers of a Fixup branch, setups §1.7) get
their own learning rate ``lr(t) * scalar_lr_factor`` through ``optax.multi_transform``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from gne_jax._tree import path_names

PyTree = Any

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adam")
WEIGHT_DECAY_MASKS = ("kernels", "conv_dense", "all", "none")
CLIP_KINDS = ("none", "value", "norm")
# Fixup's scalar biases and multipliers as named in gne_jax.models.resnet_cifar.
FIXUP_SCALAR_PATTERN = r"^[^/]+/(bias1a|bias1b|bias2a|bias2b|scale)$|^(stem|head)/bias$"


def param_names(params: PyTree) -> PyTree:
    """The pytree of ``'/'``-joined parameter paths, e.g. ``'Conv_0/kernel'``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "/".join(path_names(p)), params)


def is_kernel(name: str, leaf) -> bool:
    """A conv/dense weight: a leaf named ``kernel`` (or ``*_kernel``) with ≥ 2 dims."""
    last = name.rsplit("/", 1)[-1]
    return (last == "kernel" or last.endswith("_kernel")) and jnp.ndim(leaf) >= 2


def weight_decay_mask(params: PyTree, mode: str = "kernels") -> PyTree:
    """Boolean pytree saying which leaves get weight decay.

    Modes:
      ``kernels``: conv/dense kernels only (ImageNet runs; no decay on biases,
        normalization affine parameters, activation slopes or Fixup scalars).
      ``conv_dense``: kernels and the biases of the same conv/dense modules (the
        paper's CIFAR mask: parameter names containing ``conv``/``linear``).
      ``all``: every parameter (the Fixup-scalar ResNet runs).
      ``none``: no parameter.
    """
    if mode not in WEIGHT_DECAY_MASKS:
        raise ValueError(
            f"optimizer.weight_decay_mask={mode!r} is unknown; expected one of {WEIGHT_DECAY_MASKS}"
        )
    names = param_names(params)
    flat_names = jax.tree.leaves(names)
    kernel_modules = {
        n.rsplit("/", 1)[0] for n, leaf in zip(flat_names, jax.tree.leaves(params), strict=True)
        if is_kernel(n, leaf)
    }

    def decide(name, leaf):
        if mode == "all":
            return True
        if mode == "none":
            return False
        if is_kernel(name, leaf):
            return True
        if mode == "conv_dense":
            module, last = name.rsplit("/", 1) if "/" in name else ("", name)
            return last == "bias" and module in kernel_modules
        return False

    return jax.tree.map(decide, names, params)


def scalar_labels(params: PyTree, pattern: str) -> PyTree:
    """Labels ``'scalar'`` for leaves whose path matches ``pattern``, else ``'default'``.

    An empty pattern labels every leaf ``'default'``.
    """
    if not pattern:
        return jax.tree.map(lambda _: "default", params)
    regex = re.compile(pattern)
    return jax.tree.map(
        lambda n: "scalar" if regex.search(n) else "default", param_names(params)
    )


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Learning rate per step: linear warm-up, then constant / step / cosine decay.

    ``step``: ``lr * factor**k`` after the k-th boundary in ``lr_boundaries_epochs``.
    ``cosine``: ``lr * (1 + cos(π t/T))/2`` over the steps after warm-up.
    """
    opt = config.optimizer
    kind = opt.schedule
    if kind not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={kind!r} is unknown; expected one of {SCHEDULES}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    total = int(config.num_epochs * steps_per_epoch)
    warmup = int(round(opt.get("warmup_epochs", 0.0) * steps_per_epoch))
    lr = float(opt.learning_rate)
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "step":
        boundaries: dict[int, float] = {}
        for e in opt.lr_boundaries_epochs:  # boundaries rounding to one step: both decays
            b = int(round(e * steps_per_epoch)) - warmup
            boundaries[b] = boundaries.get(b, 1.0) * float(opt.lr_decay_factor)
        main = optax.piecewise_constant_schedule(lr, boundaries)
    else:
        main = optax.cosine_decay_schedule(lr, max(total - warmup, 1))
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(lr * opt.get("warmup_init_factor", 0.0), lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def _clip(opt) -> optax.GradientTransformation:
    kind = opt.get("clip", "none")
    if kind not in CLIP_KINDS:
        raise ValueError(f"optimizer.clip={kind!r} is unknown; expected one of {CLIP_KINDS}")
    if kind == "value":
        return optax.clip(float(opt.clip_value))
    if kind == "norm":
        return optax.clip_by_global_norm(float(opt.clip_value))
    return optax.identity()


def _direction(opt) -> optax.GradientTransformation:
    name = opt.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is unknown; expected one of {OPTIMIZERS}")
    if name == "sgd":
        if opt.momentum == 0.0:
            return optax.identity()
        return optax.trace(decay=float(opt.momentum), nesterov=bool(opt.nesterov))
    return optax.scale_by_adam(b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps))


def make_optimizer(
    config: ml_collections.ConfigDict, params: PyTree, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
    """Returns ``(tx, schedule)`` for ``config.optimizer`` (see module docstring)."""
    opt = config.optimizer
    schedule = make_schedule(config, steps_per_epoch)
    mode = opt.get("weight_decay_mask", "kernels")
    weight_decay_mask(params, mode)  # validates the mode before training starts
    _direction(opt)
    mask = lambda p: weight_decay_mask(p, mode)  # callable: works on multi_transform subtrees
    labels = scalar_labels(params, opt.get("scalar_pattern", ""))
    if set(jax.tree.leaves(labels)) == {"default"}:
        tail = _tail(opt, schedule, mask, 1.0)
    else:
        factor = float(opt.get("scalar_lr_factor", 1.0))
        tail = optax.multi_transform(
            {"default": _tail(opt, schedule, mask, 1.0),
             "scalar": _tail(opt, schedule, mask, factor)},
            labels,
        )
    # Clipping comes first and sees the whole tree, so a global norm stays global.
    return optax.chain(_clip(opt), tail), schedule


def _tail(opt, schedule, mask, lr_factor):
    parts = []
    if opt.weight_decay:
        parts.append(optax.add_decayed_weights(float(opt.weight_decay), mask=mask))
    parts.append(_direction(opt))
    parts.append(optax.scale_by_learning_rate(lambda t: schedule(t) * lr_factor))
    return optax.chain(*parts)
