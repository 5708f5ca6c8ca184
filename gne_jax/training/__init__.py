"""Training on real or synthetic data (optax, Orbax, TFDS array_record files).

* `config`: the default ``ml_collections`` config that ``configs/train/*.py`` start from;
* `input_pipeline`: seeded, resumable, per-process sharded input;
* `optim`: optimizers and learning-rate schedules from the config;
* `train`: train state, steps and ``train_and_evaluate(config, workdir)``;
* `checkpoint`: Orbax checkpoints that keep the last finite state;
* `metrics`: metric files, TensorBoard, curves and per-layer gradient norms.

Needs the ``[train]`` extra (``pip install gne_jax[train]``); ``import gne_jax`` does not
import this package.
"""
