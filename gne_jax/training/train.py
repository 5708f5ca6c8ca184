r"""Training loop: ``python -m gne_jax.train --config configs/train/<name>.py --workdir <dir>``.

Layout of the Flax examples: ``create_train_state``,
``train_step``, ``eval_step`` and ``train_and_evaluate(config, workdir)``, which
a notebook can import and call directly.

Data parallelism: a 1-D ``Mesh`` over all devices with axis ``'data'``; the
batch is sharded along it and the state replicated, so under ``jit`` the
batch-normalization statistics and the loss are global means over the whole
batch, and one device and N devices compute the same step.

One step minimizes the mean cross-entropy
``L = -(1/B) Σ_i [λ log p(y_i|x̃_i) + (1-λ) log p(y_π(i)|x̃_i)]`` with mixup
``x̃ = λx + (1-λ)x_π``, ``λ ~ Beta(α, α)`` (λ = 1 without mixup), and records
``‖∇_W L‖²_F`` of every conv/dense kernel before clipping (setups §1.5).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gne_jax.training import input_pipeline, optim
from gne_jax.training.checkpoint import Checkpointer, NonFiniteError, all_finite
from gne_jax.training.metrics import (
    MetricsWriter,
    load_grad_norms,
    plot_curves,
    save_grad_norms,
)
from gne_jax.training.unroll import should_unroll, unroll_scans

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. ``sums`` accumulates the current epoch's train metrics."""

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    sums: dict[str, jax.Array]
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)


class TrainResult(NamedTuple):
    """What ``train_and_evaluate`` returns: final state and the per-epoch rows."""

    state: TrainState
    history: list[dict[str, Any]]


def _zero_sums() -> dict[str, jax.Array]:
    return {
        "loss": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.float32),
        "count": jnp.zeros((), jnp.float32),
        "first_nonfinite_step": jnp.full((), -1, jnp.int32),
        "nonfinite_kind": jnp.zeros((), jnp.int32),
    }


def _tree_finite(tree) -> jax.Array:
    """``all(isfinite(x))`` over every floating leaf of ``tree`` (True for no leaves)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.ones((), bool)
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


# --------------------------------------------------------------------------- config checks


LOADERS = ("grain", "numpy")


def _number(config, key: str, *, integer: bool = False, minimum=None, maximum=None,
            above=None, below=None) -> None:
    """Raises ``ValueError`` naming ``config.<key>`` unless it is a number in range."""
    node = config
    for part in key.split("."):
        node = node[part]
    value = node
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if ok and integer and float(value) != int(value):
        ok = False
    if ok:
        ok = np.isfinite(float(value))
    want = "an integer" if integer else "a finite number"
    if ok and minimum is not None and value < minimum:
        ok, want = False, f"{want} >= {minimum}"
    if ok and maximum is not None and value > maximum:
        ok, want = False, f"{want} <= {maximum}"
    if ok and above is not None and value <= above:
        ok, want = False, f"{want} > {above}"
    if ok and below is not None and value >= below:
        ok, want = False, f"{want} < {below}"
    if not ok:
        raise ValueError(f"config.{key}={value!r} must be {want}")


def _check_boundaries(config) -> None:
    """Raises ``ValueError`` naming ``config.optimizer.lr_boundaries_epochs`` unless it is a
    sequence of finite epochs > 0 in strictly increasing order."""
    value = config.optimizer.lr_boundaries_epochs
    entries = list(value) if isinstance(value, list | tuple) else None
    ok = entries is not None and all(
        isinstance(e, int | float | np.integer | np.floating) and not isinstance(e, bool)
        and np.isfinite(float(e)) and e > 0 for e in entries)
    if ok and any(b <= a for a, b in zip(entries[:-1], entries[1:], strict=True)):
        ok = False
    if not ok:
        raise ValueError(
            f"config.optimizer.lr_boundaries_epochs={value!r} must be a sequence of epochs > 0 "
            "in strictly increasing order (the learning rate is multiplied by "
            "lr_decay_factor at each), e.g. --config.optimizer.lr_boundaries_epochs='(80, 120)'")


def unknown_fields(config: ml_collections.ConfigDict) -> list[str]:
    """Fields of ``config`` (outside ``model``) that the default config does not have."""
    from gne_jax.training.config import base_config  # noqa: PLC0415

    base = base_config()
    out = []

    def walk(node, ref, prefix):
        for k in node.keys():
            if k not in ref:
                out.append(prefix + k)
            elif isinstance(ref[k], ml_collections.ConfigDict) and k != "model" and isinstance(
                    node[k], ml_collections.ConfigDict):
                walk(node[k], ref[k], f"{prefix}{k}.")

    walk(config, base, "")
    return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any training with a message that names the field and says what to change.

    Checks names (dataset, normalization, optimizer, schedule, clip, weight-decay mask,
    unknown fields), ranges (seed >= 0, learning rate > 0, warm-up factor in [0, 1],
    increasing positive learning-rate boundaries, positive batch sizes, epochs,
    logging/eval intervals, moments probes >= 2, image size, classes) and the dataset's
    files. Limits that need the split sizes are checked by :func:`check_split_sizes`.
    """
    unknown = unknown_fields(config)
    if unknown:
        raise ValueError(f"config field(s) {unknown} are unknown; see "
                         "gne_jax/training/config.py for the valid fields")
    _number(config, "seed", integer=True, minimum=0, below=2**32)
    input_pipeline.check_dataset_config(config)  # names, sizes, paths (no data read)
    norm = config.model.get("normalization", "none")
    from gne_jax.models import NORMALIZATIONS as known  # noqa: PLC0415

    if norm not in known:
        raise ValueError(
            f"config.model.normalization={norm!r} is unknown; expected one of {tuple(known)}"
        )
    n_dev = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        b = config[key]
        if not isinstance(b, int | np.integer) or b <= 0 or b % n_dev:
            b = int(b) if isinstance(b, int | float) else 0
            lower = max(n_dev, b - b % n_dev)
            raise ValueError(
                f"config.{key}={config[key]} must be a positive multiple of the device count "
                f"{n_dev} (the batch is split evenly over devices); use e.g. "
                f"--config.{key}={lower} or {lower + n_dev}"
            )
    if config.num_train_steps <= 0:
        _number(config, "num_epochs", above=0)
    else:
        _number(config, "num_train_steps", integer=True, above=0)
    _number(config, "log_every_steps", integer=True, minimum=1)
    _number(config, "eval_every_epochs", integer=True, minimum=1)
    _number(config, "checkpoint_every_steps", integer=True, minimum=0)
    _number(config, "grad_norm_epochs", integer=True, minimum=0)
    _number(config, "moments_every_steps", integer=True, minimum=0)
    if config.moments_every_steps > 0:
        _number(config, "moments_num_probes", integer=True, minimum=2)  # for a std. error
        _number(config, "moments_batch", integer=True, minimum=1)
    _number(config, "prefetch", integer=True, minimum=1)
    if config.get("loader", "numpy") not in LOADERS:
        raise ValueError(f"config.loader={config.loader!r} is unknown; expected one of {LOADERS}")
    _number(config, "loader_threads", integer=True, minimum=1)
    _number(config, "loader_workers", integer=True, minimum=0)
    _number(config, "stop_after_steps", integer=True)
    opt = config.optimizer
    if opt.name not in optim.OPTIMIZERS:
        raise ValueError(f"config.optimizer.name={opt.name!r} is unknown; "
                         f"expected one of {optim.OPTIMIZERS}")
    if opt.schedule not in optim.SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={opt.schedule!r} is unknown; "
                         f"expected one of {optim.SCHEDULES}")
    if opt.get("clip", "none") not in optim.CLIP_KINDS:
        raise ValueError(f"config.optimizer.clip={opt.clip!r} is unknown; "
                         f"expected one of {optim.CLIP_KINDS}")
    if opt.weight_decay_mask not in optim.WEIGHT_DECAY_MASKS:
        raise ValueError(f"config.optimizer.weight_decay_mask={opt.weight_decay_mask!r} is "
                         f"unknown; expected one of {optim.WEIGHT_DECAY_MASKS}")
    _number(config, "optimizer.learning_rate", above=0)
    _number(config, "optimizer.weight_decay", minimum=0)
    _number(config, "optimizer.lr_decay_factor", above=0)
    _number(config, "optimizer.warmup_epochs", minimum=0)
    # The warm-up rises linearly from warmup_init_factor × learning_rate to learning_rate.
    _number(config, "optimizer.warmup_init_factor", minimum=0, maximum=1)
    _check_boundaries(config)
    _number(config, "optimizer.scalar_lr_factor", minimum=0)
    if opt.name == "sgd":
        _number(config, "optimizer.momentum", minimum=0, below=1)
    else:
        _number(config, "optimizer.b1", minimum=0, below=1)
        _number(config, "optimizer.b2", minimum=0, below=1)
        _number(config, "optimizer.eps", above=0)
    if opt.get("clip", "none") != "none":
        _number(config, "optimizer.clip_value", above=0)
    _number(config, "mixup_alpha", minimum=0)
    should_unroll(config.get("unroll_scans", "auto"))


def check_split_sizes(config: ml_collections.ConfigDict, num_train: int, num_eval: int) -> None:
    """Raises ``ValueError`` naming the field when a batch exceeds its split.

    ``batch_size`` must fit in the training split (the last partial batch is dropped) and
    ``moments_batch`` (the eval split's first images) in the eval split. A larger
    ``eval_batch_size`` is capped instead (:func:`eval_batch_size`).
    """
    if input_pipeline.steps_per_epoch(num_train, int(config.batch_size)) == 0:
        raise ValueError(f"config.batch_size={config.batch_size} exceeds the training split "
                         f"size {num_train}; lower it")
    if config.moments_every_steps > 0 and config.moments_batch > num_eval:
        raise ValueError(f"config.moments_batch={config.moments_batch} exceeds the eval split "
                         f"size {num_eval} (the moments use the split's first moments_batch "
                         "images); lower it")


# --------------------------------------------------------------------------- model and state


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """``gne_jax.models.create_model(config.model)`` with ``num_classes`` from the dataset."""
    from gne_jax import models  # noqa: PLC0415  (models may import heavier pieces)

    model_cfg = ml_collections.ConfigDict(config.model.to_dict())
    if "num_classes" in model_cfg or not model_cfg:
        model_cfg.num_classes = num_classes
    return models.create_model(model_cfg)


def kernel_paths(params: PyTree) -> list[tuple[str, ...]]:
    """Paths of conv/dense kernels in dict insertion order (Flax: call order)."""
    out = []

    def walk(node, path):
        if isinstance(node, dict | flax.core.FrozenDict):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        elif optim.is_kernel("/".join(path), node):
            out.append(path)

    walk(params, ())
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


class LayerGradNorms(NamedTuple):
    """Per-layer squared gradient norms: ``fn(grads)[l] = ‖∇_{W_l} L‖²_F``, input layer first.

    For a ``BlockModel`` the order follows ``model.layout()``; the kernels of a
    scanned stage are stacked on a leading block axis and give one entry per block.
    """

    names: list[str]
    fn: Callable[[PyTree], jax.Array]


def layer_grad_norms(model: nn.Module, params: PyTree) -> LayerGradNorms:
    """The :class:`LayerGradNorms` of ``model`` with parameters ``params``."""
    stages = None
    if hasattr(model, "layout"):
        try:
            stages = [st for st in model.layout() if st.name in params]
        except Exception:  # noqa: BLE001  (custom models: fall back to the plain walk)
            stages = None
    entries = []  # (top-level key, kernel paths inside it, block names if stacked)
    if stages:
        for st in stages:
            paths = [(st.name, *p) for p in kernel_paths(params[st.name])]
            if paths:
                entries.append((paths, st.block_names if st.scanned else None))
    covered = {p for paths, _ in entries for p in paths}
    if set(kernel_paths(params)) != covered:
        entries = [([p], None) for p in kernel_paths(params)]
    names = []
    for paths, blocks in entries:
        if blocks is None:
            names += ["/".join(p) for p in paths]
        else:
            names += [f"{b}/{'/'.join(p[1:])}" for b in blocks for p in paths]

    def fn(grads):
        out = []
        for paths, blocks in entries:
            if blocks is None:
                out += [jnp.sum(jnp.square(_get(grads, p)))[None] for p in paths]
            else:  # (kernels, blocks) -> block-major order
                per = jnp.stack([jnp.sum(jnp.square(_get(grads, p)),
                                         axis=tuple(range(1, _get(grads, p).ndim)))
                                 for p in paths])
                out.append(per.T.reshape(-1))
        return jnp.concatenate(out) if out else jnp.zeros((0,))

    return LayerGradNorms(names, fn)


def create_train_state(model: nn.Module, config, image_shape, steps_per_epoch: int, key):
    """Initializes parameters (``model.init(key, x, train=False)``) and the optimizer.

    On CPU, ``model.init`` (run once) is compiled at LLVM optimization level 0: about 6×
    less compile time than the default for the serial CNN (benchmarks/RESULTS.md).
    """
    x = jnp.zeros((1, *image_shape), jnp.float32)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    variables = jax.jit(functools.partial(model.init, train=False),
                        compiler_options=options)(key, x)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    tx, schedule = optim.make_optimizer(config, params, steps_per_epoch)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), sums=_zero_sums(), apply_fn=model.apply, tx=tx)
    return state, schedule


def _variables(params, batch_stats):
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def cross_entropy(logits, labels):
    """Per-example ``-log softmax(logits)[label]``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch, *, base_key, mixup_alpha: float, grad_sq_fn,
               check_state: bool = True, apply_fn: Callable | None = None):
    """One SGD step on the global batch; returns the new state and step metrics.

    ``sums['first_nonfinite_step']`` records the first step whose loss (bit 1 of
    ``sums['nonfinite_kind']``) or, with ``check_state``, whose new parameters, batch
    statistics or optimizer state (bit 2) hold a non-finite value: one fused reduction
    ``all(isfinite(leaf))`` over the state per step. ``apply_fn`` replaces
    ``state.apply_fn`` for the forward pass (e.g. with its scans unrolled).
    """
    apply = state.apply_fn if apply_fn is None else apply_fn
    images, labels = batch["image"], batch["label"]
    key = jax.random.fold_in(base_key, state.step)
    if mixup_alpha > 0:
        k_lam, k_perm = jax.random.split(key)
        lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha)
        perm = jax.random.permutation(k_perm, images.shape[0])
        images = lam * images + (1 - lam) * images[perm]
        labels_b = labels[perm]
    else:
        lam, labels_b = 1.0, labels

    def loss_fn(params):
        variables = _variables(params, state.batch_stats)
        if state.batch_stats:
            logits, updates = apply(variables, images, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = apply(variables, images, train=True), state.batch_stats
        loss = lam * cross_entropy(logits, labels) + (1 - lam) * cross_entropy(logits, labels_b)
        return loss.mean(), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    pred = jnp.argmax(logits, -1)
    correct = lam * (pred == labels) + (1 - lam) * (pred == labels_b)
    grad_sq = grad_sq_fn(grads)  # before clipping, as the paper's hooks
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = jnp.asarray(labels.shape[0], jnp.float32)
    kind = jnp.where(jnp.isfinite(loss), 0, 1)
    if check_state:
        kind = kind | jnp.where(_tree_finite((params, new_stats, opt_state)), 0, 2)
    bad = state.sums["first_nonfinite_step"]
    first = (bad < 0) & (kind > 0)
    sums = {"loss": state.sums["loss"] + loss * n, "correct": state.sums["correct"] + correct.sum(),
            "count": state.sums["count"] + n,
            "first_nonfinite_step": jnp.where(first, state.step, bad),
            "nonfinite_kind": jnp.where(first, kind, state.sums["nonfinite_kind"])}
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state, sums=sums)
    return new_state, {"loss": loss, "grad_sq": grad_sq}


def eval_step(state: TrainState, batch):
    """Sums of loss, correct predictions and examples over the (masked) eval batch."""
    logits = state.apply_fn(_variables(state.params, state.batch_stats), batch["image"],
                            train=False)
    mask = batch["mask"]
    loss = cross_entropy(logits, batch["label"])
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}


def eval_batch_size(config, num_eval: int) -> int:
    """The global eval batch: ``config.eval_batch_size``, capped at the eval split size rounded
    up to a multiple of the device count (a larger batch would only add masked padding)."""
    n_dev = jax.device_count()
    return min(int(config.eval_batch_size), max(-(-num_eval // n_dev), 1) * n_dev)


def evaluate(p_eval_step, state, eval_source, spec, config, data_sharding):
    """Mean loss and accuracy over the whole eval split (batches of :func:`eval_batch_size`)."""
    it = input_pipeline.eval_batches(eval_source, spec,
                                     global_batch=eval_batch_size(config, len(eval_source)))
    totals = None
    for batch in input_pipeline.prefetch_to_device(it, data_sharding, config.prefetch):
        m = p_eval_step(state, batch)
        totals = m if totals is None else jax.tree.map(jnp.add, totals, m)
    totals = jax.device_get(totals)
    return {"eval_loss": float(totals["loss"] / totals["count"]),
            "eval_accuracy": float(totals["correct"] / totals["count"])}


# --------------------------------------------------------------------------- workdir


def _config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


# Fields that never change the numbers of a run: a resume may differ in them.
_RESUMABLE_KEYS = ("stop_after_steps", "progress_bar", "overwrite", "log_every_steps",
                   "resume_with_changes", "prefetch", "check_finite_state", "tensorboard",
                   "loader", "loader_threads", "loader_workers")
# Fields a finished (or interrupted) run may grow without resume_with_changes.
_EXTENDABLE_KEYS = ("num_epochs", "num_train_steps")
_HISTORY_KEY = "config_history"

_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.csv", "grad_norms.npz", "grad_norms.png",
            "moments.jsonl", "curves.png", "tensorboard")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_workdir(workdir: str) -> None:
    """Creates ``workdir`` or raises ``ValueError`` naming ``--workdir`` (a file, unwritable)."""
    if not workdir:
        raise ValueError("--workdir is empty; give the directory for checkpoints and logs")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} is a file, not a directory; give a directory "
                         "(it is created if missing)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"--workdir={workdir!r} cannot be created: {err.strerror or err}") from None
    try:
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"--workdir={workdir!r} is not writable: {err.strerror or err}") from None


def _checkpoint_steps(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def read_config_json(workdir: str) -> tuple[dict, list[dict]]:
    """The config saved in ``workdir/config.json`` and its history of resumed changes."""
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    history = saved.pop(_HISTORY_KEY, [])
    return saved, history


def _prepare_workdir(workdir: str, config) -> Callable[[], None]:
    """Refuses to mix two different runs in one workdir; records resumed changes.

    Returns ``commit()``, which writes ``config.json``: called once the checkpoint (if
    any) has been restored, so a failed resume leaves the earlier config in place.

    * The same config resumes from the latest checkpoint.
    * A larger ``num_epochs``/``num_train_steps`` extends the run from its checkpoint.
    * Other changed fields resume only with ``config.resume_with_changes=True``.
    * Every resumed change is appended to ``config.json``'s ``config_history``:
      ``{"step": resumed step, "changes": {field: [old, new]}}``.
    * A config.json without checkpoint or results (a run that failed before saving
      anything) is simply replaced.
    * Otherwise ``FileExistsError``, unless ``config.overwrite`` (deletes the earlier run).
    """
    check_workdir(workdir)
    path = os.path.join(workdir, "config.json")
    current = _config_json(config)
    history: list[dict] = []
    steps = _checkpoint_steps(workdir)
    has_results = os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    conflict = None
    if os.path.exists(path):
        previous, history = read_config_json(workdir)
        prev, cur = _flatten(previous), _flatten(current)
        changed = {k: [prev.get(k), cur.get(k)] for k in sorted(set(prev) | set(cur))
                   if prev.get(k) != cur.get(k) and k not in _RESUMABLE_KEYS}
        if not steps and not has_results:
            changed, history = {}, []  # nothing was saved: the old config.json is moot
        other = [k for k in changed if k not in _EXTENDABLE_KEYS]
        if other and steps and not config.resume_with_changes:
            conflict = (f"holds a run with a different config (fields differ: {other}); "
                        "resume it with these changes by adding "
                        "--config.resume_with_changes=True, or")
        elif changed and not steps:
            conflict = (f"holds results of a run with a different config (fields differ: "
                        f"{sorted(changed)}) and no checkpoint to resume from;")
        elif changed:
            history.append({"step": steps[-1], "changes": changed})
            logging.warning("Resuming step %d in %s with changed fields: %s", steps[-1],
                            workdir, ", ".join(f"{k}: {a!r} -> {b!r}"
                                               for k, (a, b) in changed.items()))
    if conflict is None and not steps and has_results:
        conflict = "holds results but no checkpoint to resume from;"
    if conflict is not None:
        if not config.overwrite:
            raise FileExistsError(
                f"workdir {workdir!r} {conflict} use a new --workdir, or "
                "--config.overwrite=True to delete the earlier run's outputs."
            )
        history = []
        if jax.process_index() == 0:
            logging.warning("Deleting the earlier run in %s (config.overwrite=True)", workdir)
            for name in _OUTPUTS:
                target = os.path.join(workdir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)

    def commit():
        if jax.process_index() == 0:
            with open(path, "w") as f:
                json.dump({**current, _HISTORY_KEY: history}, f, indent=2, sort_keys=True)

    return commit


def _row_kept_on_resume(step: int, steps_per_epoch: int, total: int) -> bool:
    """Whether the epoch row logged at checkpoint ``step`` stays when a run of ``total``
    steps resumes from it.

    A row at a step that is not an epoch end is the partial last epoch of a shorter run; a
    run extended past that step logs the epoch at its end instead, as the longer run trained
    straight does (the checkpoint holds the epoch's running sums).
    """
    return step % steps_per_epoch == 0 or step >= total


def _state_dict(state: TrainState) -> dict:
    return flax.serialization.to_state_dict(state)


# --------------------------------------------------------------------------- moments hook


def _moments_hook(config, model, images):
    """Jacobian moments at the current parameters on a fixed small eval batch, or None.

    Models exposing ``blocks`` get per-block φ, φ₂, ϕ and the end-to-end moments
    through ``gne_jax.probes.block_moments``; other models the end-to-end moments through
    ``gne_jax.probes.moments.jacobian_moments``. Evaluated in eval mode (running statistics).
    """
    if config.moments_every_steps <= 0:
        return None
    from gne_jax.probes.block_moments import block_moments  # noqa: PLC0415
    from gne_jax.probes.moments import jacobian_moments  # noqa: PLC0415

    x = images[: int(config.moments_batch)]
    num_probes = int(config.moments_num_probes)
    # Weights are passed as data (``params=``, or the variables of ``block_moments``): every
    # call at new weights reuses the one program compiled at the first call of the run.
    apply_eval = functools.partial(model.apply, train=False)

    def to_list(a):
        return [float(v) for v in np.asarray(a)]

    def hook(state, key):
        variables = _variables(state.params, state.batch_stats)
        if hasattr(model, "blocks"):
            bm = block_moments(model, variables, x, key=key, train=False, num_probes=num_probes)
            e2e = bm.end_to_end
            return {"phi": float(e2e.phi), "phi_sem": float(e2e.phi_sem),
                    "phi2": float(e2e.phi2), "varphi": float(e2e.varphi),
                    "block_names": list(bm.names), "block_phi": to_list(bm.blocks.phi),
                    "block_phi2": to_list(bm.blocks.phi2),
                    "block_varphi": to_list(bm.blocks.varphi)}
        m = jacobian_moments(apply_eval, x, params=variables, key=key, num_probes=num_probes)
        return {"phi": float(m.phi), "phi_sem": float(m.phi_sem), "phi2": float(m.phi2),
                "varphi": float(m.varphi)}

    return hook


# --------------------------------------------------------------------------- main loop


class _TqdmStream:
    """A text stream that writes through ``tqdm.write`` so log lines do not break the bar."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        from tqdm import tqdm  # noqa: PLC0415

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self):
        self.stream.flush()


@contextlib.contextmanager
def _logging_through_tqdm():
    """Routes console log handlers (stdlib and absl) through ``tqdm.write`` meanwhile."""
    import logging as pylogging  # noqa: PLC0415

    handlers = list(pylogging.getLogger().handlers)
    try:
        absl_handler = logging.get_absl_handler()
        handlers.append(absl_handler.python_handler)
    except Exception:  # noqa: BLE001
        pass
    swapped = []
    for h in handlers:
        stream = getattr(h, "stream", None)
        if isinstance(h, pylogging.StreamHandler) and stream in (sys.stderr, sys.stdout):
            swapped.append((h, stream))
            h.stream = _TqdmStream(stream)
    try:
        yield
    finally:
        for h, stream in swapped:
            h.stream = stream


def _param_count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model: nn.Module | None = None) -> TrainResult:
    """Trains ``config.model`` on ``config.dataset``; logs, checkpoints and resumes in ``workdir``.

    Args:
      config: see ``gne_jax.training.config.base_config``.
      workdir: output directory; a workdir with a checkpoint of the same config is resumed
        (or extended, or resumed with changes: see ``_prepare_workdir``).
      model: optional Flax module overriding ``config.model`` (for custom networks).
    Returns:
      ``TrainResult(state, history)``; history holds one dict per epoch.
    Raises:
      ValueError: a bad config field or workdir, before any compilation.
      NonFiniteError: the loss or the state became non-finite; the last good checkpoint
        is kept.
    """
    validate_config(config)
    check_workdir(workdir)
    spec = input_pipeline.dataset_spec(config)
    train_src = input_pipeline.make_source(config, "train")
    eval_src = input_pipeline.make_source(config, "eval")
    batch = int(config.batch_size)
    spe = input_pipeline.steps_per_epoch(len(train_src), batch)
    check_split_sizes(config, len(train_src), len(eval_src))
    total = int(config.num_train_steps) if config.num_train_steps > 0 else int(
        config.num_epochs * spe)
    if total <= 0:
        raise ValueError(f"config.num_epochs={config.num_epochs} gives no training step "
                         f"({spe} steps per epoch); raise it")
    if model is None:
        model = create_model(config, spec.num_classes)
    commit_config = _prepare_workdir(workdir, config)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    key = jax.random.PRNGKey(int(config.seed))
    init_key, step_key, moments_key = jax.random.split(key, 3)
    image_shape = (spec.image_size, spec.image_size, spec.channels)
    logging.info("Compiling and running model.init (%s, input %s)", type(model).__name__,
                 image_shape)
    t0 = time.perf_counter()
    state, schedule = create_train_state(model, config, image_shape, spe, init_key)
    state = jax.device_put(state, replicated)
    logging.info("Initialized %d parameters in %.1f s", _param_count(state.params),
                 time.perf_counter() - t0)
    grad_norms = layer_grad_norms(model, state.params)
    grad_names = grad_norms.names

    ckpt = Checkpointer(workdir)
    writer = MetricsWriter(workdir, tensorboard=bool(config.tensorboard))
    start = 0
    if ckpt.latest_step() is not None:
        try:
            restored, meta = ckpt.restore(_state_dict(state))
        except Exception as err:  # noqa: BLE001  (Orbax raises many types on a mismatch)
            writer.close()
            ckpt.close()
            raise ValueError(
                f"the checkpoint in {ckpt.directory} does not fit the configured model and "
                f"optimizer ({type(err).__name__}: {str(err)[:300]}); fields that change the "
                "parameters' shapes cannot be resumed: use a new --workdir") from None
        state = jax.device_put(flax.serialization.from_state_dict(state, restored), replicated)
        start = int(meta["step"])
        writer.truncate(start, keep_row_at_step=_row_kept_on_resume(start, spe, total))
        logging.info("Resumed from step %d in %s", start, ckpt.directory)
    commit_config()
    grad_steps, grad_vals = load_grad_norms(workdir, start)
    history = writer.rows()

    unroll = should_unroll(config.get("unroll_scans", "auto"))
    p_train_step = jax.jit(
        functools.partial(train_step, base_key=step_key, mixup_alpha=float(config.mixup_alpha),
                          grad_sq_fn=grad_norms.fn,
                          check_state=bool(config.get("check_finite_state", True)),
                          apply_fn=unroll_scans(state.apply_fn) if unroll else None),
        out_shardings=(replicated, replicated), donate_argnums=0)
    p_eval_step = jax.jit(eval_step, out_shardings=replicated)
    moments_x = None
    hook = None
    if config.moments_every_steps > 0:  # the eval split's first moments_batch images
        first = next(input_pipeline.eval_batches(eval_src, spec, global_batch=int(
            config.moments_batch), process_index=0, process_count=1))
        moments_x = jax.device_put(first["image"], replicated)
        hook = _moments_hook(config, model, moments_x)

    stop = total if config.stop_after_steps <= 0 else min(total, int(config.stop_after_steps))
    grad_limit = int(config.grad_norm_epochs) * spe
    if start >= stop:
        logging.info("Nothing to do: the checkpoint in %s is at step %d >= %d (raise "
                     "--config.num_epochs to extend the run)", workdir, start, stop)
    loader_kw = dict(global_batch=batch, seed=int(config.seed), start_step=start,
                     num_steps=stop, augment=bool(config.dataset.augment))
    if config.get("loader", "numpy") == "grain":
        from gne_jax.training import grain_loader  # noqa: PLC0415

        it = grain_loader.train_batches(train_src, spec, **loader_kw,
                                        num_threads=int(config.get("loader_threads", 2)),
                                        num_workers=int(config.get("loader_workers", 0)))
    else:
        it = input_pipeline.train_batches(train_src, spec, **loader_kw)
    batches = input_pipeline.prefetch_to_device(it, data_sharding, int(config.prefetch))

    pbar = None
    if config.progress_bar and jax.process_index() == 0 and stop > start:
        from tqdm import tqdm  # noqa: PLC0415

        pbar = tqdm(total=stop, initial=start, desc="train", unit="step", leave=False,
                    dynamic_ncols=True)
    pending_grads: list[tuple[int, jax.Array]] = []
    epoch_t0, epoch_steps = time.perf_counter(), 0
    last_saved = ckpt.latest_step()

    def check_finite(step):
        bad = int(state.sums["first_nonfinite_step"])
        if bad >= 0:
            kind = int(state.sums["nonfinite_kind"])
            what = ("training loss" if kind == 1 else
                    "parameters / batch statistics / optimizer state (the loss was finite)"
                    if kind == 2 else "training loss and state")
            _flush_grads(plot=True)
            writer.close()
            ckpt.close()
            if pbar is not None:
                pbar.close()
            saved = (f"the last good checkpoint (step {last_saved}) in {ckpt.directory} is kept"
                     if last_saved is not None else
                     "no checkpoint had been saved yet (set --config.checkpoint_every_steps)")
            raise NonFiniteError(
                f"non-finite {what} at step {bad} (epoch {bad // spe}). Training stopped; "
                f"{saved}. Try a lower --config.optimizer.learning_rate, gradient clipping "
                "(--config.optimizer.clip=value) or a normalization layer, and resume in the "
                "same workdir with --config.resume_with_changes=True."
            )

    def _flush_grads(plot=False):
        if not pending_grads and not plot:
            return
        for s, g in pending_grads:
            grad_steps.append(s)
            grad_vals.append(np.asarray(g))
        pending_grads.clear()
        if grad_steps:
            save_grad_norms(workdir, grad_names, np.asarray(grad_steps), np.stack(grad_vals),
                            plot=plot)

    def save(step):
        nonlocal last_saved
        _flush_grads()
        ckpt.save(step, _state_dict(state), {"step": step})
        last_saved = step

    prev_loss = None
    with contextlib.ExitStack() as stack:
        if pbar is not None:
            stack.enter_context(_logging_through_tqdm())
        for step in range(start, stop):
            if step == start:
                logging.info("Compiling the train step (%s%s; the first step waits for it)",
                             "scans unrolled" if unroll else "scanned stages",
                             ", cached on disk" if jax.config.jax_compilation_cache_dir else "")
                t_compile = time.perf_counter()
            state, metrics = p_train_step(state, next(batches))
            if step == start:  # leave compilation out of the step time
                jax.block_until_ready(state)
                logging.info("First step (compile + run) took %.1f s",
                             time.perf_counter() - t_compile)
                epoch_t0 = time.perf_counter()
            else:
                epoch_steps += 1
            if step < grad_limit:
                pending_grads.append((step, metrics["grad_sq"]))
            done = step + 1
            if pbar is not None:
                # Wait for the previous step only: the bar moves every step, one step behind
                # the dispatched work, without draining the device queue.
                if prev_loss is not None:
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{float(prev_loss):.4f}", refresh=False)
                prev_loss = metrics["loss"]
            if done % int(config.log_every_steps) == 0 or done == stop:
                check_finite(done)
            if hook is not None and done % int(config.moments_every_steps) == 0:
                check_finite(done)
                writer.write_moments(
                    {"step": done, **hook(state, jax.random.fold_in(moments_key, done))})
            if done % spe == 0 or done == total:  # epoch end (or a partial last epoch)
                check_finite(done)
                sums = jax.device_get(state.sums)
                elapsed = time.perf_counter() - epoch_t0
                row = {"step": done, "epoch": done // spe if done % spe == 0 else done / spe,
                       "train_loss": float(sums["loss"] / sums["count"]),
                       "train_accuracy": float(sums["correct"] / sums["count"]),
                       "learning_rate": float(schedule(done - 1)),
                       # Steady-state timing: the run's first (compiling) step is left out.
                       "step_time_s": elapsed / epoch_steps if epoch_steps else float("nan"),
                       "images_per_s": (batch * epoch_steps / elapsed if epoch_steps
                                        else float("nan"))}
                if done % spe == 0:  # a partial last epoch keeps its sums in the checkpoint,
                    # so a run extended past it logs the whole epoch at its end
                    state = state.replace(sums=jax.device_put(_zero_sums(), replicated))
                if (done // spe) % int(config.eval_every_epochs) == 0 or done == total:
                    row.update(evaluate(p_eval_step, state, eval_src, spec, config,
                                        data_sharding))
                writer.write(row)
                history.append(row)
                epoch_t0, epoch_steps = time.perf_counter(), 0
            every = int(config.checkpoint_every_steps)
            if (every > 0 and done % every == 0) or done == stop:
                check_finite(done)
                jax.block_until_ready(state)
                t_save = time.perf_counter()
                save(done)
                epoch_t0 += time.perf_counter() - t_save  # step time excludes checkpointing
        if pbar is not None:
            pbar.update(stop - pbar.n)
            pbar.close()
    _flush_grads(plot=True)
    if not all_finite(state.params):
        raise NonFiniteError("final parameters are non-finite")
    plot_curves(workdir, history)
    writer.close()
    ckpt.close()
    return TrainResult(state, history)
