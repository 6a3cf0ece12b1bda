#!/usr/bin/env bash
# The GPU checks in one run: the CUDA tests, then the reward-math and trainer benchmarks on the GPU
# at the CPU benchmarks' tiny size and at Qwen2-0.5B's shape (896 hidden, 24 layers, 14 heads / 2 KV
# heads, MLP 4,864, vocabulary 151,936; random weights, fp32; exact and randomized SVD), and the memory options'
# peak GPU memory at the paper's length on the 1.5B shape (bench.train_memory). Each result is one JSON file in
# $OUT (default ./gpu-out); a failing step is logged and the others still run; exit status 1 if any
# step failed.
#
#   bash bench/gpu.sh                 # on a machine with a CUDA device and the project installed
#   PYTHON=/path/to/python OUT=dir bash bench/gpu.sh
#   ONLY="tests memory" bash bench/gpu.sh   # some steps only (tags: env tests penalty reward memory),
#                                           # e.g. to fit a short lease of the machine
set -u
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
ONLY=${ONLY:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=0

step() {  # step TAG NAME OUTFILE CMD...: run CMD, stdout to $OUT/OUTFILE, stderr to the log
  local tag=$1 name=$2 file=$3
  shift 3
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $tag "* ]]; then
    echo "== $name: skipped (ONLY=$ONLY)" >&2
    return
  fi
  local t0=$SECONDS
  echo "== $name" >&2
  if "$@" > "$OUT/$file"; then
    echo "== $name: ok ($((SECONDS - t0)) s)" >&2
  else
    echo "== $name: FAILED (exit $?, $((SECONDS - t0)) s)" >&2
    failed=1
  fi
}

QWEN05B=(--hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864)

step env "environment" environment.txt bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c 'import torch, transformers; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))'"
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
  "$PY" -m bench.train_memory --device cuda --preset qwen2-1.5b
exit $failed
