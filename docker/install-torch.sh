#!/bin/sh
# Installs torch, torchvision and torchcodec as one matching set (the versions the tests run with).
#   install-torch.sh index TORCH_INDEX_URL   from that index (CPU-only or CUDA builds)
#   install-torch.sh wheelhouse              from /wheelhouse alone, no network (docker/make-wheelhouse.sh)
set -eu
set -- "$1" "${2:-}"
packages="torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.*"
if [ "$1" = wheelhouse ]; then
  # shellcheck disable=SC2086
  pip install --no-index --find-links /wheelhouse $packages
else
  # shellcheck disable=SC2086
  pip install --index-url "$2" $packages
fi
