#!/usr/bin/env bash
# GPU check, for when an NVIDIA GPU is lent (under 5 minutes on one GPU):
#   bench/gpu_check.sh            # needs torch (CUDA build), deepspeed, transformers, peft
# 1. exactness: ZeRO-0/1/2/3 and CPU offload on one GPU rank (world size 1) against one plain CPU
#    process on the same global batches: parameters within 1e-5, identical winners (JSON);
# 2. time: MoLFAdamW.step() against torch's fused AdamW on the GPU (bench/optimizer_step.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d)}"
CASES="z0,z1,z2,z3,z1_offload,z2_offload,z3_offload,z3_offload_param,z2_efficient,z3_efficient"

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
"$PY" tests/workers/zero_train.py --reference --out "$OUT/ref" --cases "$CASES" --data-world 1
"$(dirname "$(command -v "$PY")")/deepspeed" --num_gpus 1 tests/workers/zero_train.py \
  --out "$OUT/gpu" --cases "$CASES" --data-world 1
"$PY" tests/workers/zero_train.py --compare "$OUT/ref" --out "$OUT/gpu" --cases "$CASES" \
  | tee "$OUT/exactness.json"
"$PY" bench/optimizer_step.py --device cuda | tee "$OUT/optimizer_step.json"
echo "results in $OUT"
