#!/usr/bin/env bash
# The GPU checks in one run: the CUDA tests, then the reward-math and trainer benchmarks on the GPU
# at the CPU benchmarks' tiny size and at Qwen2-0.5B's shape (896 hidden, 24 layers, 14 heads / 2 KV
# heads, MLP 4,864, vocabulary 151,936; random weights, fp32; exact and randomized SVD), and the memory options'
# peak GPU memory at the paper's length on the 1.5B shape (bench.train_memory). Each result is one JSON file in
# $OUT (default ./gpu-out); a failing step is logged and the others still run; exit status 1 if any
# step failed, 2 if ONLY names an unknown tag or no step.
#
#   bash bench/gpu.sh                 # on a machine with a CUDA device and the project's dependencies
#   PYTHON=/path/to/python OUT=dir bash bench/gpu.sh
#   ONLY="tests memory" bash bench/gpu.sh   # some steps only (tags: env tests penalty reward memory),
#                                           # e.g. to fit a short lease of the machine
#   bash bench/gpu_call.sh "env tests memory"   # the same through the lent GPU machine (its wheels, log)
#
# Each step runs under `timeout STEP_TIMEOUT` (default 300 s) so a hang costs one step, not the lease.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
ONLY=${ONLY:-}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
TAGS="env tests penalty reward memory"
for t in $ONLY; do
  if [[ " $TAGS " != *" $t "* ]]; then
    echo "bench/gpu.sh: unknown tag '$t' in ONLY='$ONLY'; tags are: $TAGS (separated by spaces)" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
failed=0
ran=0

step() {  # step TAG NAME OUTFILE CMD...: run CMD, stdout to $OUT/OUTFILE, stderr to the log
  local tag=$1 name=$2 file=$3
  shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $tag "* ]]; then
    echo "== $name: skipped (ONLY=$ONLY)" >&2
    return
  fi
  local t0=$SECONDS
  ran=$((ran + 1))
  echo "== $name" >&2
  if timeout -k 10 "$STEP_TIMEOUT" "$@" > "$OUT/$file"; then
    echo "== $name: ok ($((SECONDS - t0)) s)" >&2
  else
    local rc=$?
    [ "$rc" -eq 124 ] && echo "== $name: TIMED OUT after $STEP_TIMEOUT s (STEP_TIMEOUT)" >&2
    echo "== $name: FAILED (exit $rc, $((SECONDS - t0)) s)" >&2
    failed=1
  fi
}

QWEN05B=(--hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864)

step env "environment" environment.txt bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  \"$PY\" -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))' && \
  \"$PY\" -c 'import pydantic, math_verify, l2t_core.trainer; print(\"pydantic\", pydantic.VERSION, \"math_verify ok, l2t_core imports\")'"
step tests "CUDA tests" pytest.txt "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step penalty "penalty, tiny (CPU benchmark's size)" penalty_tiny.json "$PY" -m bench.penalty --device cuda
step penalty "penalty, Qwen2-0.5B shape" penalty_qwen05b.json "$PY" -m bench.penalty --device cuda "${QWEN05B[@]}" --vocab 151936
step penalty "penalty, Qwen2-0.5B shape, randomized SVD" penalty_qwen05b_randomized.json \
  "$PY" -m bench.penalty --device cuda "${QWEN05B[@]}" --vocab 151936 --svd randomized
step reward "reward overhead, tiny" reward_overhead_tiny.json "$PY" -m bench.reward_overhead --device cuda
for svd in exact randomized; do
  step reward "reward overhead, Qwen2-0.5B shape, $svd SVD" "reward_overhead_qwen05b_$svd.json" \
    "$PY" -m bench.reward_overhead --device cuda "${QWEN05B[@]}" --max-new-tokens 512 --svd "$svd"
done
step memory "memory options at the paper's length, Qwen2-1.5B shape (bf16, 16,384 response tokens)" train_memory_qwen2_1.5b.json \
  "$PY" -m bench.train_memory --device cuda --preset qwen2-1.5b --case-timeout 120
if [ "$ran" -eq 0 ]; then
  echo "bench/gpu.sh: no step ran (ONLY='$ONLY')" >&2
  exit 2
fi
exit $failed
