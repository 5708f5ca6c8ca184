"""The default training configuration; ``configs/train/*.py`` start from it.

Every field is documented inline. Command-line overrides work as in the Flax
examples, e.g. ``--config.num_epochs=10 --config.optimizer.learning_rate=0.05``.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Paper CIFAR-10 defaults (setups §1.2) with a placeholder model."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.dataset = ml_collections.ConfigDict()
    # cifar10 | cifar100 | mnist | imagenet2012 | synthetic | image_folder | npz | tfds
    c.dataset.name = "cifar10"
    c.dataset.data_dir = ""  # TFDS data_dir; "" = TFDS default (~/tensorflow_datasets)
    c.dataset.augment = True  # pad-crop + flip (CIFAR-style; ImageNet: random-resized crop)
    # image_folder: DIR with train/<class>/*.png|jpg and test/<class>/...; npz: FILE.npz
    # holding x_train, y_train, x_test, y_test.
    c.dataset.path = ""
    # tfds: any TFDS dataset prepared on disk (array_record) under data_dir.
    c.dataset.tfds_name = ""
    c.dataset.train_split = "train"
    c.dataset.eval_split = "test"
    # Per-channel normalization; () = computed from the training split (image_folder,
    # npz, tfds) or the dataset's known values (cifar10, mnist, ...).
    c.dataset.mean = ()
    c.dataset.std = ()
    # synthetic: all of these; image_folder / tfds: image_size (images are resized to
    # it) and channels (1 = grayscale, 3 = RGB); num_classes comes from the data.
    c.dataset.num_train = 2048
    c.dataset.num_eval = 512
    c.dataset.image_size = 32
    c.dataset.channels = 3
    c.dataset.num_classes = 10

    # Filled by gne_jax.models.default_config(name) in each config file.
    c.model = ml_collections.ConfigDict()

    c.batch_size = 128  # global batch over all devices and processes
    c.eval_batch_size = 100
    c.num_epochs = 130
    c.num_train_steps = -1  # > 0 overrides num_epochs * steps_per_epoch
    c.stop_after_steps = -1  # > 0: stop (as if preempted) after this step; resumable

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd | adam
    c.optimizer.learning_rate = 0.01
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 5e-4
    c.optimizer.weight_decay_mask = "conv_dense"  # kernels | conv_dense | all | none
    c.optimizer.clip = "value"  # none | value | norm
    c.optimizer.clip_value = 2.0
    c.optimizer.schedule = "step"  # constant | step | cosine
    c.optimizer.lr_boundaries_epochs = (80,)
    c.optimizer.lr_decay_factor = 0.1
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.warmup_init_factor = 0.0
    c.optimizer.scalar_pattern = ""  # regex on param paths: Fixup scalars at their own lr
    c.optimizer.scalar_lr_factor = 0.1

    c.mixup_alpha = 0.0  # > 0: mixup with Beta(alpha, alpha)

    c.log_every_steps = 50  # progress bar + non-finite check
    c.checkpoint_every_steps = 1000  # plus the end of the run; 0 = only at the end
    c.eval_every_epochs = 1
    c.grad_norm_epochs = 3  # log per-layer squared weight-gradient norms this many epochs
    c.moments_every_steps = 0  # > 0: Jacobian moments of the network every N steps
    c.moments_num_probes = 16
    c.moments_batch = 8
    c.prefetch = 2  # batches placed on the devices ahead of the step
    # Training batches: "grain" reads them in num_threads threads / num_workers worker
    # processes (same batches as "numpy", which reads one at a time in one thread).
    c.loader = "grain"  # grain | numpy
    c.loader_threads = 2
    c.loader_workers = 0
    c.progress_bar = True
    c.tensorboard = True
    c.overwrite = False  # allow writing into a workdir holding an earlier run's results
    # Resume the checkpoint in the workdir although some fields differ from the saved
    # run's (e.g. a corrected learning rate); the changes are recorded in config.json.
    # A larger num_epochs / num_train_steps (extending a run) needs no flag.
    c.resume_with_changes = False
    # Evaluate the train step with the models' scanned stages unrolled: "auto" = on for
    # CPU backends, where weight-gradient convolutions inside loops are ~30x slower.
    c.unroll_scans = "auto"  # auto | true | false
    # Check params, batch statistics and optimizer state (not only the loss) for
    # non-finite values inside every step; read at every log step.
    c.check_finite_state = True
    return c


def config_module(path: str):
    """The config file ``path`` executed as a module (whatever its suffix)."""
    import importlib.machinery  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    import os  # noqa: PLC0415

    name = "_gne_config_" + os.path.splitext(os.path.basename(path))[0]
    loader = importlib.machinery.SourceFileLoader(name, path)
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_file_location(name, path, loader=loader))
    loader.exec_module(module)
    return module


def from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of the config file ``path`` (how ``*_smoke.py`` reuse a full config)."""
    module = config_module(path)
    return module.get_config() if arg is None else module.get_config(arg)


def smoke(c: ml_collections.ConfigDict, *, image_size: int = 16, num_train: int = 256,
          num_eval: int = 128, batch_size: int = 32, num_epochs: int = 2,
          num_classes: int | None = None) -> ml_collections.ConfigDict:
    """Shrinks ``c`` to a seconds-long offline run on the synthetic dataset."""
    classes = num_classes or (1000 if c.dataset.name == "imagenet2012" else 10)
    c.dataset.name = "synthetic"
    c.dataset.image_size = image_size
    c.dataset.num_train = num_train
    c.dataset.num_eval = num_eval
    c.dataset.num_classes = min(classes, 10)
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    c.num_epochs = num_epochs
    c.optimizer.lr_boundaries_epochs = tuple(num_epochs * (i + 1) / 3 for i in range(2))
    c.optimizer.warmup_epochs = 0.0
    c.log_every_steps = 4
    c.checkpoint_every_steps = 0
    c.grad_norm_epochs = 1
    c.loader_workers = 0
    return c
