#!/bin/sh
# Makes a base image from Debian packages, for hosts that cannot pull from an image registry:
#
#   docker/make-base-image.sh [NAME]                 # default NAME: upgrader-base:bookworm
#   UPGRADER_BASE_IMAGE=upgrader-base:bookworm docker compose build
#
# Needs mmdebstrap (Debian package) and a Debian package mirror; runs as root. Python 3.11 with venv, as the
# official python:3.11-slim-bookworm image has it, plus passwd for the image's user.
set -eu
name="${1:-upgrader-base:bookworm}"
mmdebstrap --quiet --variant=minbase \
  --include=python3.11,python3.11-venv,python3-venv,python-is-python3,ca-certificates,passwd \
  bookworm - | docker import --change 'CMD ["python3"]' - "$name"
docker image inspect --format '{{.RepoTags}} {{.Size}} bytes' "$name"
