#!/usr/bin/env bash
# Checks charlm-jax on a CUDA GPU in one go: package versions, train-step speed and MFU
# (float32 and bfloat16), cached vs naive decode speed, the model and sampling tests on the
# GPU, then a full `nanogpt` training run (within what is left of BUDGET_S seconds) and a
# sample from it. Results and logs go to $OUT.
#
#     pip install -e ".[cuda12,test]" && OUT=gpu_check bash experiments/gpu_check.sh
set -u
OUT=${OUT:-gpu_check}
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-900}
WORKDIR=${WORKDIR:-/tmp/charlm_gpu_nanogpt}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() { echo; echo "== $* (${SECONDS} s)"; }
quiet() { grep -v "^[IW][0-9]"; }  # absl's INFO/WARNING lines

step versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c '
import importlib.metadata as md, jax
for p in ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections", "clu"]:
    print(p, md.version(p))
print(jax.devices())'

for dtype in float32 bfloat16; do
  step "train step speed, nanogpt, $dtype"
  timeout 150 $PY experiments/benchmark.py --config=configs/transformer.py:nanogpt \
      --config.model.dtype=$dtype --steps=30 --warmup=5 --decode_batches= \
      --out="$OUT/bench_nanogpt_$dtype.json" 2>&1 | quiet
done

step "decode speed, cached vs naive"
timeout 150 $PY experiments/benchmark_sampling.py --runs=nanogpt:1,nanogpt:16,nanogpt_baby:1 \
    --new_tokens=500 2>&1 | quiet | tail -n 12

step "model and sampling tests on the GPU"
timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_sampling.py \
    2>&1 | tail -n 15

left=$((BUDGET_S - SECONDS - 60))
step "nanogpt training run (at most ${left} s)"
rm -rf "$WORKDIR"
timeout "$left" $PY -m charlm_jax.main --config=configs/transformer.py:nanogpt \
    --workdir="$WORKDIR" 2>&1 | quiet | tail -n 25
cp "$WORKDIR/summary.json" "$OUT/nanogpt_summary.json" 2>/dev/null
cp "$WORKDIR"/*.png "$OUT/" 2>/dev/null

step sample
timeout 50 $PY -m charlm_jax.generate --workdir="$WORKDIR" --prompt="ROMEO:" \
    --max_new_tokens=300 --seed=0 2>&1 | quiet | tail -n 20
step done
