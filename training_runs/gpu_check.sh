#!/usr/bin/env bash
# The GPU measurements the CPU machine cannot make (run from the repository root on a GPU
# host with jax[cuda12] installed): ResNet-50 SMN vs BN step time, the SMN-vs-BN speed
# figure at ResNet-56 size, and a few epochs of the serial CNN on a real dataset.
set -euo pipefail
out=${1:-training_runs/results_gpu}
mkdir -p "$out"
python benchmarks/train_step.py norms --norm-model resnet50 --image-size 224 --batch 128 \
    --steps 10 --repeats 3 | tee "$out/resnet50_smn_bn.txt"
python -m training_runs speed --depth 56 --batch 128 --repeats 20 --out "$out"
python -m gne_jax.train --config=configs/train/cifar10_serial.py:kaiming_normal,relu,smn \
    --config.dataset.name=npz --config.dataset.path=training_runs/data/digits.npz \
    --config.dataset.image_size=32 --config.num_epochs=20 --config.progress_bar=False \
    --workdir="$out/serial32_digits" 2>&1 | grep -E "epoch|First step" | tee "$out/serial32.txt"
