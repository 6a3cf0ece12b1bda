#!/usr/bin/env bash
# One call of the lent GPU machine (run from the repository root there, with `.whl` carried):
#
#   bash bench/gpu_call.sh "env tests memory"     # first call: ~5 min on an H100/H200
#   bash bench/gpu_call.sh "penalty reward"       # second call, if >= 7 min of device time are left
#
# Installs the carried wheels (bench/gpu_wheels.txt) into /tmp/site, then runs bench/gpu.sh with
# ONLY=TAGS, its results and a log (every step's start, end and status, and each memory case's
# result as it comes) in $OUT, so a call cut off at its limit still returns what it measured.
# The device tool returns at most 8 files: name the tags of one call so that it writes fewer
# (env 1, tests 1, penalty 3, reward 3, memory 1, plus the log); all tags at once write 10.
set -uo pipefail
cd "$(dirname "$0")/.."
TAGS=${1:?usage: bash bench/gpu_call.sh "TAGS" (some of: env tests penalty reward memory)}
OUT=${OUT:?OUT is not set: this script is meant for the device tool, which sets it}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/ carried: pydantic and math-verify must already be installed (bash bench/gpu_wheels.sh here)" >&2
fi
ONLY="$TAGS" OUT="$OUT" timeout -k 15 "${CALL_TIMEOUT:-570}" bash bench/gpu.sh 2>&1 | tee "$OUT/log"
