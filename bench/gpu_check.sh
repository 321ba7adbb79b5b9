#!/usr/bin/env bash
# The GPU path of Upgrader, proven in one command on a machine with a CUDA GPU.
#
#   bash bench/gpu_check.sh                # from the repository root
#   OUT=/some/dir bash bench/gpu_check.sh  # the report goes to $OUT/gpu_check_report.md (else ./gpu_check_report.md)
#
# Steps (each logged; a failed step is reported and the others still run):
#   1. environment: a CUDA torch that is already importable (system or image, often itself a venv) is
#      used as is, with the wheels in $WHEELS installed (no index) into a folder on PYTHONPATH, so an
#      offline image works; only where no torch exists is a venv made and the project pip-installed.
#   2. the test suite's CUDA-marked tests (pytest -m cuda)
#   3. every architecture trained for one epoch with --amp bf16 (small --limit-train), and the long-run
#      recipe (64x8 + channel attention, natural photos) for 3 epochs with bf16 and --compile: its speed per epoch
#   4. a 1-GPU torchrun job (NCCL), which publishes
#   5. the service on CUDA: /upscale benchmarked (bench/bench_service.py) on the published models
#   6. in-process throughput on CUDA next to the CPU (bench/gpu_throughput.py)
#   7. every architecture trained for one epoch with --compile (last: the slowest step); then a table of
#      every published version (device, epoch time, training images/s, PSNR against bicubic)
# Without CUDA it says so and exits 1; it exits 2 when any step failed, 0 when all passed.
#
# Settings (environment): UPGRADER_DATA (CIFAR-10 copy; default ../shared/datasets/cifar10-jpeg, else the
# packed copy bench/gpu_data.py makes, .gpudata/cifar, unpacked from a carried .gpupack/gpudata.tgz; if neither
# exists a small synthetic ImageFolder is made so the GPU path still runs, and the report says
# its PSNRs mean nothing), UPGRADER_NATURAL_DATA (sr-natural; default ../shared/datasets/sr-natural, else .gpudata/natural),
# PYTHON (default python3), LIMIT_TRAIN (default 8192), VENV (default .venv-gpu; its -site folder takes
# the wheels), WHEELS (a folder
# of wheels installed first, with no index: for a machine that cannot reach PyPI; default ./.whl if
# it exists, which bench/gpu_wheels.sh fills here), STEP_TIMEOUT (seconds any one step may run, default 600; a leased GPU is time-boxed),
# DEADLINE (seconds from the start by which every step must have ended, so the report's tables are
# still written when a time-boxed lease runs short; default none), BENCH_SECONDS (measured seconds per
# service-benchmark cell and per throughput figure, default 3).
# BENCH_MODELS (the published models steps 5 and 6 measure, comma-separated; default
# subpixel_residual,subpixel_residual_64x8ca,conv,resnet18).
# In a 15-minute lease (starts included), STEP_TIMEOUT=100 DEADLINE=200 BENCH_SECONDS=2
# BENCH_MODELS=subpixel_residual,conv runs steps 2-5 in ~250 s on an H200, which leaves room for `bench/gpu_train.sh`
# with MINUTES=5 in the same call (~550 s together); steps 6 and 7 then take ~70 s in a second call. The machine
# goes back after 30 s idle, so the second call must follow at once.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REPORT_DIR="${OUT:-$ROOT}"
mkdir -p "$REPORT_DIR"
REPORT="$REPORT_DIR/gpu_check_report.md"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
LOGS="$REPORT_DIR/gpu_check_logs"
mkdir -p "$LOGS"
STORE="$WORK/store"
LIMIT_TRAIN="${LIMIT_TRAIN:-8192}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv-gpu}"
STEP_TIMEOUT="${STEP_TIMEOUT:-600}"
DEADLINE="${DEADLINE:-}"
BENCH_SECONDS="${BENCH_SECONDS:-3}"
WHEELS="${WHEELS:-$ROOT/.whl}"
# pip must fail fast on a machine with no route to an index, not retry for minutes
export PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-5}" PIP_RETRIES="${PIP_RETRIES:-0}" PIP_DISABLE_PIP_VERSION_CHECK=1
FAILED=()

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
section() { printf '\n## %s\n\n' "$1" >> "$REPORT"; }

# step NAME COMMAND...: runs it (at most $STEP_TIMEOUT s), logs to $LOGS/NAME.log, records status, time and the
# log's tail in the report.
step() {
  local name="$1"; shift
  log "step $name: $*"
  local start=$SECONDS status limit="$STEP_TIMEOUT"
  if [ -n "$DEADLINE" ] && [ $((DEADLINE - SECONDS)) -lt "$limit" ]; then limit=$((DEADLINE - SECONDS)); fi
  if [ "$limit" -le 0 ]; then
    section "$name: SKIPPED (DEADLINE=${DEADLINE}s reached)"; log "step $name: skipped at the deadline"; FAILED+=("$name"); return 1
  fi
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  status=$?
  local took=$((SECONDS - start))
  local verdict="FAILED (exit $status)"
  [ $status -eq 0 ] && verdict=ok
  [ $status -eq 124 ] && verdict="FAILED (stopped after ${limit}s: STEP_TIMEOUT or DEADLINE)"
  section "$name: $verdict in ${took}s"
  log "step $name: $verdict in ${took}s"
  { printf '```\n$ %s\n' "$*"; tail -n 40 "$LOGS/$name.log"; printf '```\n'; } >> "$REPORT"
  [ $status -eq 0 ] || FAILED+=("$name")
  return $status
}

{
  echo "# Upgrader GPU check"
  echo
  echo "- started: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'not found')"
  echo "- logs: $LOGS"
} > "$REPORT"

# ---- 1. environment ------------------------------------------------------------------------------
has_torch() { { [ -x "$1" ] || command -v "$1" > /dev/null 2>&1; } && "$1" -c "import torch" 2> /dev/null; }
PY=""
for candidate in "$ROOT/.venv/bin/python" "$VENV/bin/python" "$PYTHON"; do
  if has_torch "$candidate"; then PY="$candidate"; break; fi
done
if [ -n "$PY" ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2> /dev/null; then
  echo "no CUDA GPU here: $PY has torch $("$PY" -c 'import torch; print(torch.__version__)'), and torch.cuda.is_available() is False" \
    | tee -a "$REPORT" >&2
  exit 1
fi
if [ -z "$PY" ] && ! nvidia-smi > /dev/null 2>&1; then
  echo "no CUDA GPU here: no torch is importable and nvidia-smi finds no GPU" | tee -a "$REPORT" >&2
  exit 1
fi
if [ -n "$PY" ] && [ "$PY" != "$ROOT/.venv/bin/python" ]; then
  # An importable torch (the image's; often itself a venv, whose packages a nested venv would not see): keep that
  # interpreter and add what is missing into a target folder on PYTHONPATH. The wheels first, with no index.
  SITE="$VENV-site"
  mkdir -p "$SITE"
  if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl > "$LOGS/wheels.log" 2>&1 \
      || log "the wheels in $WHEELS did not install (see $LOGS/wheels.log)"
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
elif [ -z "$PY" ]; then
  # No torch anywhere: a venv, and pip installs the project with its dependencies (needs an index).
  "$PYTHON" -m venv "$VENV" || { echo "cannot create a venv at $VENV" >&2; exit 1; }
  PY="$VENV/bin/python"
  "$PY" -m pip install -q -e "$ROOT[test,bench]" > "$LOGS/install.log" 2>&1 \
    || log "pip could not install the project (see $LOGS/install.log)"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
MISSING="$("$PY" - <<'EOF'
import importlib
needed = ["torch", "torchvision", "safetensors", "numpy", "PIL", "tqdm", "matplotlib", "rich", "fastapi", "uvicorn", "pydantic",
          "pydantic_settings", "multipart", "prometheus_client", "pytest", "httpx"]
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)"
CUDA_INFO="$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")' 2>&1)"
{
  section "environment"
  echo "- python: $PY ($("$PY" --version 2>&1))"
  echo "- torch, CUDA build, cuda available, devices, device: $CUDA_INFO"
  echo "- missing modules: ${MISSING:-none}"
} >> "$REPORT"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no CUDA GPU here (torch: $CUDA_INFO): nothing to check" | tee -a "$REPORT" >&2
  exit 1
fi
[ -z "$MISSING" ] || log "missing modules: $MISSING (steps that need them will fail)"

# ---- data ----------------------------------------------------------------------------------------
# The lent machine has no ../shared: the packed copy travels as one archive (bench/gpu_data.py).
if [ ! -d "$ROOT/.gpudata" ] && [ -f "$ROOT/.gpupack/gpudata.tgz" ]; then tar xzf "$ROOT/.gpupack/gpudata.tgz" -C "$ROOT"; fi
DATA="${UPGRADER_DATA:-$ROOT/../shared/datasets/cifar10-jpeg}"
[ -n "${UPGRADER_DATA:-}" ] || [ -d "$DATA/train" ] || DATA="$ROOT/.gpudata/cifar"
if [ ! -d "$DATA/train" ] || [ ! -d "$DATA/test" ]; then
  DATA="$WORK/synthetic-cifar"
  echo "- data: no CIFAR-10 copy found; a synthetic ImageFolder ($DATA) made from examples/*-32x32.png: PSNRs below mean nothing" >> "$REPORT"
  "$PY" - "$DATA" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root, rng = Path(sys.argv[1]), np.random.default_rng(0)
sources = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(Path("examples").glob("*-32x32.png"))]
for split, count in [("train", 2048), ("test", 256)]:
    for label in range(2):
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count // 2):
            image = np.roll(sources[(i + label) % len(sources)], rng.integers(0, 32, 2), axis=(0, 1))
            image = np.clip(image * rng.uniform(0.6, 1.2) + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image[:, ::-1] if i % 2 else image).save(folder / f"{i:05d}.jpg", quality=95)
EOF
else
  echo "- data: $DATA" >> "$REPORT"
fi
NATURAL="${UPGRADER_NATURAL_DATA:-$ROOT/../shared/datasets/sr-natural}"
[ -n "${UPGRADER_NATURAL_DATA:-}" ] || [ -d "$NATURAL/bsd200" ] || NATURAL="$ROOT/.gpudata/natural"
NATURAL_ARGS=()
[ -d "$NATURAL/bsd200" ] && NATURAL_ARGS=(--natural "$NATURAL" --natural-share 0.5)
export UPGRADER_DATA="$DATA" UPGRADER_CACHE="$WORK/cache"
COMMON=(--data "$DATA" --store "$STORE" --limit-train "$LIMIT_TRAIN" --limit-val 1024 --epochs 1 --device cuda --no-progress
        --batch-size 256)

# ---- 2. CUDA-marked tests ------------------------------------------------------------------------
step cuda-tests "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider tests/test_cuda.py

# ---- 3. every architecture, one epoch with bf16 autocast (with torch.compile: step 7) ---------------
ALL_MODELS="$("$PY" -c 'from upgrader.architectures import ARCHITECTURES; print(",".join(sorted(ARCHITECTURES)))')"
step train-amp-bf16 "$PY" -m trainer "${COMMON[@]}" --models "$ALL_MODELS" --amp bf16
# the long-run recipe (64x8, channel attention, batch 64, natural share 0.5) for 3 epochs, bf16 + compile:
# its training images/s in the table below (last of 3 epochs: the first one compiles) against the CPU's for the same
# recipe (docs/training.md, "On a GPU") is the GPU speed-up per epoch
step train-new-default "$PY" -m trainer "${COMMON[@]}" --epochs 3 --models subpixel_residual --publish-as subpixel_residual_64x8ca \
  --arch-params '{"width": 64, "depth": 8, "attention": 16}' --amp bf16 --compile --loss l1 --lr 2e-3 --batch-size 64 \
  --augment dihedral --ema 0.999 "${NATURAL_ARGS[@]}"

# ---- 4. torchrun, one GPU, NCCL ----------------------------------------------------------------------
TORCHRUN=("$PY" -m torch.distributed.run)
step torchrun-nccl "${TORCHRUN[@]}" --standalone --nproc_per_node 1 -m trainer "${COMMON[@]}" --models conv --publish-as conv_torchrun
if ! grep -q "world_size=1 backend=nccl" "$LOGS/torchrun-nccl.log" 2>/dev/null; then
  echo "the torchrun job did not start under NCCL (no 'world_size=1 backend=nccl' in its log)" >> "$REPORT"; FAILED+=(torchrun-backend)
fi
"$PY" -c 'import torch.distributed as d; print("NCCL available:", d.is_nccl_available())' >> "$REPORT" 2>&1

# ---- 5. the service on CUDA, benchmarked over HTTP --------------------------------------------------
WANTED_MODELS="${BENCH_MODELS:-subpixel_residual,subpixel_residual_64x8ca,conv,resnet18}"
BENCH_MODELS="$("$PY" -c "
from model_store import ModelStore; names = ModelStore('$STORE').models()
print(','.join(n for n in '$WANTED_MODELS'.split(',') if n in names))")"
step serve-cuda-bench env UPGRADER_DEVICE=cuda "$PY" bench/bench_service.py --store "$STORE" --models "$BENCH_MODELS" \
  --servers batched,batch1 --concurrency 1,64 --duration "$BENCH_SECONDS" --data "$DATA" --ceiling-seconds 0 \
  --json "$LOGS/bench_service.json"
if ! grep -q '"device": "cuda"' "$LOGS/bench_service.json" 2>/dev/null && ! grep -q "cuda" "$LOGS/serve-cuda-bench.log"; then
  echo "warning: the service benchmark log never mentions cuda" >> "$REPORT"
fi

# ---- 6. in-process throughput, CUDA next to CPU ----------------------------------------------------
step throughput "$PY" bench/gpu_throughput.py --store "$STORE" --models "$BENCH_MODELS" --seconds "$BENCH_SECONDS"
{ section "in-process throughput (images/s)"; sed -n '/^GPU:/,$p' "$LOGS/throughput.log"; } >> "$REPORT"

# ---- 7. every architecture with torch.compile (last: the slowest step, and step 3's recipe run compiles already)
step train-compile "$PY" -m trainer "${COMMON[@]}" --models "$ALL_MODELS" --compile
# ---- per-epoch times and metrics of what was published ---------------------------------------------
section "published versions (device; last epoch's seconds and training images/s; PSNR vs bicubic)"
"$PY" - "$STORE" >> "$REPORT" 2>&1 <<'EOF'
import sys
from model_store import ModelStore
store = ModelStore(sys.argv[1])
print("| model | version | arch params | batch | amp | compile | device | epochs | epoch images | last epoch s (with eval) | "
      "training images/s | PSNR | bicubic | natural PSNR (bicubic) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in store.models():
    for version in store.versions(name):
        m = store.manifest(name, version)
        natural = m["metrics"].get("natural")
        images = m["args"].get("epoch_size") or m["dataset"]["train_size"]
        last = m["history"][-1]
        seconds, train_seconds = last["seconds"], last.get("train_seconds", last["seconds"])
        print(f"| {name} | {version} | {m['architecture'].get('params') or ''} | {m['recipe']['batch_size']} | {m['recipe'].get('amp')} | "
              f"{m['args'].get('compile')} | {m.get('device_name', m['device'])} | {len(m['history'])} | {images:,} | {seconds:.1f} | "
              f"{images / train_seconds:,.0f} | "
              f"{m['metrics']['model']['psnr']:.3f} | "
              f"{m['metrics']['bicubic']['psnr']:.3f} | "
              + (f"{natural['model']['psnr']:.3f} ({natural['bicubic']['psnr']:.3f})" if natural else "-") + " |")
EOF
step store-verify "$PY" -m model_store --store "$STORE" verify conv

section "result"
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "all steps passed" >> "$REPORT"
  log "all steps passed; report: $REPORT"
  exit 0
fi
echo "failed steps: ${FAILED[*]}" >> "$REPORT"
log "failed steps: ${FAILED[*]}; report: $REPORT"
exit 2
