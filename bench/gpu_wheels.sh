#!/usr/bin/env bash
# Download the wheels of bench/gpu_wheels.txt into .whl/ for the GPU machine (CPython 3.12,
# x86-64 manylinux), where pip has no registry. Run here, where it has one; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
grep -v '^\s*\(#\|$\)' bench/gpu_wheels.txt | while read -r spec; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$spec"
done
ls .whl
