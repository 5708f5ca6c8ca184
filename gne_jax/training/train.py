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

import functools
import json
import os
import shutil
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
    }


# --------------------------------------------------------------------------- config checks


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Fails before any training with a message that says what to change."""
    input_pipeline.dataset_spec(config)  # unknown dataset
    norm = config.model.get("normalization", "none")
    from gne_jax.models import NORMALIZATIONS as known  # noqa: PLC0415

    if norm not in known:
        raise ValueError(
            f"config.model.normalization={norm!r} is unknown; expected one of {tuple(known)}"
        )
    n_dev = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        b = int(config[key])
        if b <= 0 or b % n_dev:
            lower = max(n_dev, b - b % n_dev)
            raise ValueError(
                f"config.{key}={b} must be a positive multiple of the device count {n_dev} "
                f"(the batch is split evenly over devices); use e.g. --config.{key}={lower} "
                f"or {lower + n_dev}"
            )
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
    if config.mixup_alpha < 0:
        raise ValueError(f"config.mixup_alpha={config.mixup_alpha} must be >= 0")


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
    """Initializes parameters (``model.init(key, x, train=False)``) and the optimizer."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(key, x)
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


def train_step(state: TrainState, batch, *, base_key, mixup_alpha: float, grad_sq_fn):
    """One SGD step on the global batch; returns the new state and step metrics."""
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
            logits, updates = state.apply_fn(variables, images, train=True,
                                             mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = state.apply_fn(variables, images, train=True), state.batch_stats
        loss = lam * cross_entropy(logits, labels) + (1 - lam) * cross_entropy(logits, labels_b)
        return loss.mean(), (logits, new_stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    pred = jnp.argmax(logits, -1)
    correct = lam * (pred == labels) + (1 - lam) * (pred == labels_b)
    grad_sq = grad_sq_fn(grads)  # before clipping, as the paper's hooks
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = jnp.asarray(labels.shape[0], jnp.float32)
    bad = state.sums["first_nonfinite_step"]
    bad = jnp.where((bad < 0) & ~jnp.isfinite(loss), state.step, bad)
    sums = {"loss": state.sums["loss"] + loss * n, "correct": state.sums["correct"] + correct.sum(),
            "count": state.sums["count"] + n, "first_nonfinite_step": bad}
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


def evaluate(p_eval_step, state, eval_source, spec, config, data_sharding):
    """Mean loss and accuracy over the whole eval split."""
    it = input_pipeline.eval_batches(eval_source, spec, global_batch=int(config.eval_batch_size))
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


_RESUMABLE_KEYS = ("stop_after_steps", "progress_bar", "overwrite", "log_every_steps")


_OUTPUTS = ("checkpoints", "metrics.jsonl", "metrics.csv", "grad_norms.npz", "grad_norms.png",
            "moments.jsonl", "curves.png", "tensorboard")


def _prepare_workdir(workdir: str, config) -> None:
    """Refuses to mix two different runs in one workdir.

    The same config resumes from the latest checkpoint. A different config, or results
    without a checkpoint, raise ``FileExistsError`` unless ``config.overwrite``, which
    deletes the earlier run's outputs.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    current = _config_json(config)
    conflict = None
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        strip = lambda d: {k: v for k, v in d.items() if k not in _RESUMABLE_KEYS}
        if strip(previous) != strip(current):
            diff = sorted(k for k in set(previous) | set(current)
                          if previous.get(k) != current.get(k) and k not in _RESUMABLE_KEYS)
            conflict = f"holds a run with a different config (fields differ: {diff})"
    has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
        name.isdigit() for name in os.listdir(os.path.join(workdir, "checkpoints")))
    if conflict is None and not has_ckpt and os.path.exists(os.path.join(workdir,
                                                                         "metrics.jsonl")):
        conflict = "holds results but no checkpoint to resume from"
    if conflict is not None:
        if not config.overwrite:
            raise FileExistsError(
                f"workdir {workdir!r} {conflict}. Use a new --workdir, or "
                "--config.overwrite=True to delete the earlier run's outputs."
            )
        if jax.process_index() == 0:
            logging.warning("Deleting the earlier run in %s (config.overwrite=True)", workdir)
            for name in _OUTPUTS:
                target = os.path.join(workdir, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)


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
    x = images[: int(config.moments_batch)]
    num_probes = int(config.moments_num_probes)
    try:
        from gne_jax.probes.block_moments import block_moments  # noqa: PLC0415
    except ImportError:  # per-block probes not available: end to end only
        block_moments = None

    def to_list(a):
        return [float(v) for v in np.asarray(a)]

    def hook(state, key):
        variables = _variables(state.params, state.batch_stats)
        if block_moments is not None and hasattr(model, "blocks"):
            bm = block_moments(model, variables, x, key=key, train=False, num_probes=num_probes)
            e2e = bm.end_to_end
            return {"phi": float(e2e.phi), "phi_sem": float(e2e.phi_sem),
                    "phi2": float(e2e.phi2), "varphi": float(e2e.varphi),
                    "block_names": list(bm.names), "block_phi": to_list(bm.blocks.phi),
                    "block_phi2": to_list(bm.blocks.phi2),
                    "block_varphi": to_list(bm.blocks.varphi)}
        from gne_jax.probes.moments import jacobian_moments  # noqa: PLC0415

        fn = lambda h: model.apply(variables, h, train=False)
        m = jacobian_moments(fn, x, key=key, num_probes=num_probes)
        return {"phi": float(m.phi), "phi_sem": float(m.phi_sem), "phi2": float(m.phi2),
                "varphi": float(m.varphi)}

    return hook


# --------------------------------------------------------------------------- main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       model: nn.Module | None = None) -> TrainResult:
    """Trains ``config.model`` on ``config.dataset``; logs, checkpoints and resumes in ``workdir``.

    Args:
      config: see ``gne_jax.training.config.base_config``.
      workdir: output directory; a workdir with a checkpoint of the same config is resumed.
      model: optional Flax module overriding ``config.model`` (for custom networks).
    Returns:
      ``TrainResult(state, history)``; history holds one dict per epoch.
    Raises:
      NonFiniteError: the loss became non-finite; the last good checkpoint is kept.
    """
    validate_config(config)
    spec = input_pipeline.dataset_spec(config)
    train_src = input_pipeline.make_source(config, "train")
    eval_src = input_pipeline.make_source(config, "eval")
    batch = int(config.batch_size)
    spe = input_pipeline.steps_per_epoch(len(train_src), batch)
    if spe == 0:
        raise ValueError(f"config.batch_size={batch} exceeds the training split size "
                         f"{len(train_src)}; lower it")
    total = int(config.num_train_steps) if config.num_train_steps > 0 else int(
        config.num_epochs * spe)
    if model is None:
        model = create_model(config, spec.num_classes)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    key = jax.random.PRNGKey(int(config.seed))
    init_key, step_key, moments_key = jax.random.split(key, 3)
    image_shape = (spec.image_size, spec.image_size, spec.channels)
    state, schedule = create_train_state(model, config, image_shape, spe, init_key)
    state = jax.device_put(state, replicated)
    grad_norms = layer_grad_norms(model, state.params)
    grad_names = grad_norms.names

    _prepare_workdir(workdir, config)
    ckpt = Checkpointer(workdir)
    writer = MetricsWriter(workdir, tensorboard=bool(config.tensorboard))
    start = 0
    if ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(_state_dict(state))
        state = jax.device_put(flax.serialization.from_state_dict(state, restored), replicated)
        start = int(meta["step"])
        writer.truncate(start)
        logging.info("Resumed from step %d in %s", start, ckpt.directory)
    grad_steps, grad_vals = load_grad_norms(workdir, start)
    history = writer.rows()

    p_train_step = jax.jit(
        functools.partial(train_step, base_key=step_key, mixup_alpha=float(config.mixup_alpha),
                          grad_sq_fn=grad_norms.fn),
        out_shardings=(replicated, replicated), donate_argnums=0)
    p_eval_step = jax.jit(eval_step, out_shardings=replicated)
    moments_x = None
    hook = None
    if config.moments_every_steps > 0:
        first = next(input_pipeline.eval_batches(eval_src, spec, global_batch=int(
            config.eval_batch_size)))
        moments_x = jax.device_put(first["image"][: int(config.moments_batch)], replicated)
        hook = _moments_hook(config, model, moments_x)

    stop = total if config.stop_after_steps <= 0 else min(total, int(config.stop_after_steps))
    grad_limit = int(config.grad_norm_epochs) * spe
    it = input_pipeline.train_batches(train_src, spec, global_batch=batch, seed=int(config.seed),
                                      start_step=start, num_steps=stop,
                                      augment=bool(config.dataset.augment))
    batches = input_pipeline.prefetch_to_device(it, data_sharding, int(config.prefetch))

    pbar = None
    if config.progress_bar and jax.process_index() == 0 and stop > start:
        from tqdm import tqdm  # noqa: PLC0415

        pbar = tqdm(total=stop, initial=start, desc="train", unit="step", leave=False)
    pending_grads: list[tuple[int, jax.Array]] = []
    epoch_t0, epoch_steps = time.perf_counter(), 0
    last_saved = ckpt.latest_step()

    def check_finite(step):
        bad = int(state.sums["first_nonfinite_step"])
        if bad >= 0:
            _flush_grads(plot=True)
            writer.close()
            raise NonFiniteError(
                f"non-finite training loss at step {bad} (epoch {bad // spe}). Training stopped; "
                f"the last good checkpoint (step {last_saved}) in {ckpt.directory} is kept. Try "
                "a lower --config.optimizer.learning_rate, gradient clipping "
                "(--config.optimizer.clip=value) or a normalization layer."
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

    for step in range(start, stop):
        state, metrics = p_train_step(state, next(batches))
        if step == start:  # leave compilation out of the step time
            jax.block_until_ready(state)
            epoch_t0 = time.perf_counter()
        else:
            epoch_steps += 1
        if step < grad_limit:
            pending_grads.append((step, metrics["grad_sq"]))
        done = step + 1
        if done % int(config.log_every_steps) == 0 or done == stop:
            check_finite(done)
            if pbar is not None:
                pbar.update(done - pbar.n)
                pbar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if hook is not None and done % int(config.moments_every_steps) == 0:
            check_finite(done)
            row = {"step": done, **hook(state, jax.random.fold_in(moments_key, done))}
            if jax.process_index() == 0:
                with open(os.path.join(workdir, "moments.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
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
                   "images_per_s": batch * epoch_steps / elapsed if epoch_steps else float("nan")}
            state = state.replace(sums=jax.device_put(_zero_sums(), replicated))
            if (done // spe) % int(config.eval_every_epochs) == 0 or done == total:
                row.update(evaluate(p_eval_step, state, eval_src, spec, config, data_sharding))
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
        pbar.close()
    _flush_grads(plot=True)
    if not all_finite(state.params):
        raise NonFiniteError("final parameters are non-finite")
    plot_curves(workdir, history)
    writer.close()
    ckpt.close()
    return TrainResult(state, history)
