#!/usr/bin/env bash
# Fill docker/wheels/ with every wheel the images install, so that `docker build` needs no network:
# torch pinned by constraints.txt (pip's own configuration decides where it comes from: a CPU-only
# index or a local wheel directory for the CPU image), disttrain's dependencies, and its build backend.
# Wheels are for CPython $PYTHON_VERSION on $PLATFORM, the Python of the image.
#   docker/wheelhouse.sh && docker compose -f docker/docker-compose.yml build
set -euo pipefail

PYTHON=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
WHEELS=${WHEELS:-$(dirname "$0")/wheels}
ROOT=$(dirname "$0")/..

exec "$PYTHON" -m pip download --disable-pip-version-check --dest "$WHEELS" --constraint "$ROOT/constraints.txt" \
    --only-binary=:all: --python-version "$PYTHON_VERSION" --platform "$PLATFORM" \
    --platform manylinux2014_x86_64 \
    "$ROOT" "setuptools>=68" wheel
