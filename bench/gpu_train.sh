#!/usr/bin/env bash
# subpixel_residual trained on a leased GPU, time-boxed, from data packed to travel.
#
#   .venv/bin/python bench/gpu_data.py                 # here, once: .gpudata/ and its archive .gpupack/gpudata.tgz (git-ignored)
#   bash bench/gpu_train.sh                            # there, with .gpupack carried (unpacked into .gpudata first):
#                                                      # $OUT/gpu_train.tgz and $OUT/gpu_checkpoints.tgz come back
#
# The recipe is the CPU long runs' (docs/training.md): subpixel_residual 64x8 with channel attention,
# natural share 0.5, L1, cosine over a wall-clock budget, dihedral, EMA 0.999, plus bf16 and --compile. On an
# H200 the trainer reads ~7,100 training images/s at batch 64 and ~26,000 at batch 256 (bench/gpu_check.sh), so
# the default batch is 256: nine minutes there see ~14 million images, against 3.5 million in all the CPU runs.
# It publishes into a store of its own, evaluated on all of CIFAR-10's test split and on the 30 held-out
# photographs of the whole sr-natural (gpu_data.py keeps them), so its metrics compare with the CPU runs'.
# Checkpoints go to the same archive, so a later lease can continue it (--resume).
#
# Settings (environment): MINUTES (training wall-clock budget, default 9), BATCH (256), LR (2e-3),
# ARCH_PARAMS (JSON, default 64x8 + attention 16), LOSS (l1; psnr pays as a fine-tune, see docs/training.md),
# QUANTIZE_INPUTS (default 1: --quantize-inputs, 8-bit inputs as served; 0: exact
# float inputs), EPOCH_SIZE (images per epoch, default 32768), DATA
# (default ./.gpudata), DEVICE (cuda; cpu to try the script here), RESUME (a gpu_train.tgz from an earlier
# lease to continue from; MINUTES is then the budget over all leases, as the LR schedule spans it), OUT (where
# the archives go, default ./gpu_train_out), SEED (0), TRAIN_ARGS (more trainer flags, split on spaces, e.g.
# "--no-ensemble-metrics"). The checkpoints travel back in an archive of their own: the
# device tool returns files of up to 16 MB, and the store with the checkpoints came to 15.2 MB. INIT_STORE + INIT_FROM fine-tune (or grow) a model
# trained elsewhere: INIT_STORE a store folder that travels, copied into the run's store, and INIT_FROM its
# NAME:VERSION (passed to --init-from). One version is enough; gpu_data.py --init packs it, e.g. a CPU run's:
#   .venv/bin/python bench/gpu_data.py --init runs/a/store/subpixel_residual/2
#   INIT_STORE=.gpudata/init INIT_FROM=subpixel_residual:2 ARCH_PARAMS='{"width": 64, "depth": 8, "global_attention": 1}' \
#     LOSS=psnr LR=3e-4 MINUTES=4 bash bench/gpu_train.sh
# The model that ships with the repository travels with the tree (pretrained/ is tracked), so it needs no packing
# (upgrader:2 is upgrader:1 after 5 minutes of this script: LOSS=psnr LR=5e-4 MINUTES=5 SEED=16):
#   INIT_STORE=pretrained INIT_FROM=upgrader:2 ARCH_PARAMS='{"width": 64, "depth": 8, "global_attention": 1}' ... bash bench/gpu_train.sh
#
# OVERLOAD_ROUNDS=N (default 0: off) also runs bench/overload.py for N rounds while the model trains,
# on CPUs the trainer does not use: the servers on OVERLOAD_SERVER_CPUS (0,1: a 2-CPU server, as the development
# machine), the clients on OVERLOAD_GENERATOR_CPUS (2,3), the trainer on TRAIN_CPUS (4 to the last). On the 2-CPU
# development machine the clients must share the server's CPUs; here they bring their own, as a real deployment's
# do. The service's packages come from the wheels in WHEELS (default ./.whl; carry it too), installed without an
# index. Its table and JSON go into the archive (overload.txt, overload.json).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DATA="${DATA:-$ROOT/.gpudata}"
OUT="${OUT:-$ROOT/gpu_train_out}"
MINUTES="${MINUTES:-9}"
BATCH="${BATCH:-256}"
LR="${LR:-2e-3}"
ARCH_PARAMS="${ARCH_PARAMS:-{\"width\": 64, \"depth\": 8, \"attention\": 16\}}"
EPOCH_SIZE="${EPOCH_SIZE:-32768}"
LOSS="${LOSS:-l1}"
QUANTIZE=()
[ "${QUANTIZE_INPUTS:-1}" = 1 ] && QUANTIZE=(--quantize-inputs)
DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-train.XXXXXX")"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

PACK="${PACK:-$ROOT/.gpupack/gpudata.tgz}"
[ -f "$DATA/PACKED.json" ] || [ ! -f "$PACK" ] || tar xzf "$PACK" -C "$(dirname "$DATA")"
[ -f "$DATA/PACKED.json" ] || { echo "no packed data at $DATA: run bench/gpu_data.py here and carry .gpupack" >&2; exit 1; }
if [ -n "${RESUME:-}" ]; then
  tar xzf "$RESUME" -C "$WORK"
  checkpoints="$(dirname "$RESUME")/gpu_checkpoints.tgz"  # without it the run starts again from INIT_FROM
  [ -f "$checkpoints" ] && tar xzf "$checkpoints" -C "$WORK"
fi
INIT=()
if [ -n "${INIT_FROM:-}" ]; then
  [ -d "${INIT_STORE:-}/${INIT_FROM%%:*}" ] || { echo "INIT_FROM=$INIT_FROM needs INIT_STORE, a store folder holding it" >&2; exit 1; }
  [ -d "$WORK/store" ] || cp -r "$INIT_STORE" "$WORK/store"  # a resumed archive already holds it
  INIT=(--init-from "$INIT_FROM")
fi
COMPILE=(--compile)
AMP=(--amp bf16)
[ "$DEVICE" = cuda ] || { COMPILE=(); AMP=(); }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true; cat "$DATA/PACKED.json"; } > "$WORK/machine.txt"

OVERLOAD_ROUNDS="${OVERLOAD_ROUNDS:-0}"
TRAIN_PIN=()
overload_pid=""
if [ "$OVERLOAD_ROUNDS" -gt 0 ]; then
  WHEELS="${WHEELS:-$ROOT/.whl}"
  if ! "$PY" -c "import fastapi, uvicorn, pydantic_settings" 2> /dev/null && compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl > "$WORK/wheels.log" 2>&1 || true
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  fi
  TRAIN_PIN=(taskset -c "${TRAIN_CPUS:-4-$(( $(nproc) - 1 ))}")
  # shellcheck disable=SC2086  # OVERLOAD_ARGS: extra flags, split on purpose
  "$PY" bench/overload.py --no-baseline --rounds "$OVERLOAD_ROUNDS" --server-cpus "${OVERLOAD_SERVER_CPUS:-0,1}" \
    --generator-cpus "${OVERLOAD_GENERATOR_CPUS:-2,3}" --generator-priority normal --data "$DATA/cifar" \
    --json "$WORK/overload.json" ${OVERLOAD_ARGS:-} > "$WORK/overload.txt" 2>&1 &
  overload_pid=$!
fi

# The trainer's own budget ends training in time; the outer limit only guards a hang (compile, data, evaluation).
status=0
# shellcheck disable=SC2086  # TRAIN_ARGS: extra flags, split on purpose
"${TRAIN_PIN[@]}" timeout -k 10 "$(( ${MINUTES%.*} * 60 + 240 ))" "$PY" -m trainer --models subpixel_residual --arch-params "$ARCH_PARAMS" \
  --data "$DATA/cifar" --natural "$DATA/natural" --natural-share 0.5 --epoch-size "$EPOCH_SIZE" --epoch-val 2000 \
  --loss "$LOSS" "${QUANTIZE[@]}" --lr "$LR" --batch-size "$BATCH" --lr-schedule cosine --schedule-over time --max-minutes "$MINUTES" \
  --epochs 100000 --augment dihedral --ema 0.999 --seed "${SEED:-0}" "${INIT[@]}" "${AMP[@]}" "${COMPILE[@]}" --device "$DEVICE" \
  --store "$WORK/store" --checkpoint-dir "$WORK/checkpoints" --resume --cache-dir "$WORK/cache" --no-progress ${TRAIN_ARGS:-} \
  2>&1 | tee "$WORK/train.log" || status=$?
if [ -n "$overload_pid" ]; then
  wait "$overload_pid" || echo "overload.py exited $? (see overload.txt in the archive)"
  tail -n 20 "$WORK/overload.txt"
fi
tar czf "$OUT/gpu_train.tgz" -C "$WORK" --exclude cache --exclude site --exclude checkpoints .
tar czf "$OUT/gpu_checkpoints.tgz" -C "$WORK" checkpoints
echo "gpu_train: exit $status; $OUT/gpu_train.tgz holds store/, train.log, machine.txt; $OUT/gpu_checkpoints.tgz the checkpoints"
exit "$status"
