#!/usr/bin/env bash
# molf-train through `torchrun` (one node; for many nodes add --nnodes/--rdzv-endpoint as usual).
#   launch/torchrun.sh [--config FILE] [key=value ...]            # NUM_GPUS ranks (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
BIN="$(dirname "$PY")"
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# torchrun sets OMP_NUM_THREADS=1 for each rank when it is unset, with a 4-line warning: the
# same value set here, without the warning (set it yourself to give each rank more threads).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$BIN/torchrun" --nproc_per_node "${NUM_GPUS:-2}" --master_port "${MASTER_PORT:-29500}" \
  -m molf_ds.train "$@"
