#!/usr/bin/env bash
# The GPU targets of issues 3, 4 and 6 in one run, about 8 minutes on one H100/H200:
#   bash benchmarks/gpu_targets.sh [OUT_DIR] [BLIMP_DIR]
# 1. MFU of the ~1B LM on text-only microbatches of 2,048 tokens (target >= 45%).
# 2. baby_llama + DINOv2-L step against transformers' LlamaForCausalLM (target >= 2x).
# 3. The full training loop against the step alone, babylm_reference shapes on the
#    bundled data (target >= 0.90).
# 4. The full filtered BLiMP with baby_llama (target < 60 s).
# Before 3: model creation time (benchmarks/init_time.py), which held 3 back on the H200.
# Needs jax[cuda], flax, optax, orbax-checkpoint, transformers, torch, grain and
# tensorboardX importable, and this checkout on PYTHONPATH (set below). Each part has
# its own time limit, so one slow part cannot eat the others' time; logs go to OUT_DIR.
set -u
cd "$(dirname "$0")/.."
out=${1:-benchmarks/out}
blimp=${2:-}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "   exit $? after ${SECONDS}s in all"
    grep -v -E "^(WARNING|I0000|W0000)" "$out/$name.log" | tail -n 8
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
part mfu_1b 150 python benchmarks/model_step.py --lm llama_1b --vision none --batch 8 --seq 2048 \
    --dtype bfloat16 --remat save_dots --modality text --steps 5
part baby_llama_vs_torch 150 python benchmarks/model_step.py --lm baby_llama --vision dinov2_large \
    --batch 16 --seq 512 --dtype bfloat16 --steps 5 --torch
# Model creation first: its jitted initialiser is what held the loop back on the H200 (RESULTS.md).
part init_time 90 python benchmarks/init_time.py --config benchmarks/babylm_reference_sample.yaml
part loop_vs_step 180 python benchmarks/train_throughput.py \
    --config benchmarks/babylm_reference_sample.yaml --steps 30 --warmup 10
part eval_blimp 120 python benchmarks/eval_throughput.py --preset baby_llama --batch-size 256 \
    ${blimp:+--data "$blimp"}
