#!/usr/bin/env bash
# The wheels a leased GPU machine's image lacks, for its Python, into ./.whl (git-ignored): carry it with .gpupack.
#
#   bash bench/gpu_wheels.sh              # here, once per lease; then run(carry=[".gpupack", ".whl"], ...)
#
# The image has torch, torchvision and numpy but not the service's web stack; it cannot reach an index, so
# gpu_check.sh and gpu_train.sh install these with `pip install --no-index` into a folder on PYTHONPATH. They
# are downloaded here from this machine's index for the image's Python (PY_VERSION, default 3.12: the leased GPU image's)
# as binary wheels only, so nothing builds there. The carried tree, .gpupack and .whl must fit 64 MiB in all:
# uvicorn[standard]'s optional speed-ups (uvloop, watchfiles, websockets, PyYAML) and rich's Pygments are left out
# (uvicorn runs without them), which takes the wheels from 13 MB to 6 MB.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
LEAVE_OUT=(uvloop watchfiles websockets pyyaml pygments)

rm -rf "$OUT"
"$PIP" download --quiet --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$OUT" \
  fastapi "uvicorn[standard]" pydantic pydantic-settings python-multipart prometheus-client safetensors tqdm rich \
  httpx pytest
for name in "${LEAVE_OUT[@]}"; do
  rm -f "$OUT/$name"-*.whl
done
echo "$(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1), in $OUT for Python $PY_VERSION"
