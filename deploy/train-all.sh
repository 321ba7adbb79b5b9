#!/bin/sh
# Train and publish every model the service offers, best first: subpixel_residual, the model that
# beats bicubic (docs/training.md: L1 + dihedral + EMA, then an MSE fine-tune of that version),
# then the three reference models. Each stage publishes to the store ($UPGRADER_STORE: a directory
# or s3://bucket/prefix) when it ends, so the service picks every model up as soon as it exists.
# Baked into the images as `upgrader-train-all`; docker compose (gpu profile) and the Kubernetes
# Job run it.
#
#   TRAIN_DEVICE       cuda | cpu | auto (default auto)
#   TRAIN_AMP          auto | bf16 | none (default auto: bf16 where the device computes it natively, a CUDA GPU
#                      or a CPU with AVX512-BF16/AMX, at the same PSNR; float32 elsewhere)
#   TRAIN_MAX_MINUTES  time budget per model of every stage (default: none, the full recipe)
#   UPGRADER_DATA      the dataset (default /data); UPGRADER_DOWNLOAD=1 fetches CIFAR-10 there if absent
#   arguments          go to every stage, after the recipe (e.g. `--limit-train 256 --epochs 1` for a smoke run)
set -eu

train() {
  upgrader-train --data "${UPGRADER_DATA:-/data}" --device "${TRAIN_DEVICE:-auto}" --amp "${TRAIN_AMP:-auto}" \
    ${TRAIN_MAX_MINUTES:+--max-minutes "$TRAIN_MAX_MINUTES"} ${UPGRADER_DOWNLOAD:+--download} "$@"
}

# 1. subpixel_residual, 70 epochs of L1 with dihedral augmentation and EMA.
train --models subpixel_residual --loss l1 --lr 2e-3 --batch-size 64 --lr-schedule cosine --augment dihedral --ema 0.999 --epochs 70 "$@"
# 2. its MSE fine-tune, from the version stage 1 just published (the latest one).
train --models subpixel_residual --init-from subpixel_residual --loss mse --lr 2e-4 --batch-size 64 --lr-schedule cosine --augment dihedral --ema 0.999 --epochs 38 "$@"
# 3. the reference recipe's three models.
train --models fc,conv,resnet18 --epochs 20 "$@"
