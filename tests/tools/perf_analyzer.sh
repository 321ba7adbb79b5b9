#!/usr/bin/env bash
# Triton's perf_analyzer for tests/test_service_grpc.py: prints the directory that holds it,
# installing it there first when it is missing.
#
#   $dir/bin/perf_analyzer                 the binary (from the tritonclient 2.41.0 wheel's data files;
#                                          PyPI's `perf-analyzer` package is a placeholder)
#   $dir/nvidia/cuda_runtime/lib           libcudart.so.12, which the binary links (LD_LIBRARY_PATH)
#
# The binary also links Debian's libb64.so.0d (package libb64-0d; .ci/run installs it). The wheels go to
# their own --target directory, never into the project's venv (which has a newer tritonclient).
# $dir: $UPGRADER_PERF_ANALYZER_DIR, else perf-analyzer-2.41.0 under ${UPGRADER_CI_CACHE:-/var/cache/upgrader-ci}.
set -euo pipefail
dir="${UPGRADER_PERF_ANALYZER_DIR:-${UPGRADER_CI_CACHE:-/var/cache/upgrader-ci}/perf-analyzer-2.41.0}"
python="${PYTHON:-python3}"
if [ ! -x "$dir/bin/perf_analyzer" ] || [ ! -e "$dir/nvidia/cuda_runtime/lib/libcudart.so.12" ]; then
  mkdir -p "$(dirname "$dir")"
  partial="$(mktemp -d "$dir.partial.XXXXXX")"  # installed beside it, then renamed: never a half-installed $dir
  chmod 755 "$partial"
  trap 'rm -rf "$partial"' EXIT
  "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$partial" \
    tritonclient==2.41.0 nvidia-cuda-runtime-cu12==12.9.79 >&2
  chmod +x "$partial/bin/perf_analyzer"
  rm -rf "$dir"
  mv "$partial" "$dir"
fi
echo "$dir"
