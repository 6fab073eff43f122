#!/usr/bin/env bash
# molf-train through the `deepspeed` launcher.
#   launch/deepspeed.sh [--config FILE] [key=value ...]            # one node, NUM_GPUS ranks
#   NUM_GPUS=8 launch/deepspeed.sh ds_config=zero3 model=Qwen/Qwen2.5-3B
#   HOSTFILE=hostfile launch/deepspeed.sh ...                     # many nodes ("host slots=8")
# Without a GPU the ranks are CPU processes over gloo (DS_ACCELERATOR=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
BIN="$(dirname "$PY")"
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
if [ -n "${HOSTFILE:-}" ]; then
  exec "$BIN/deepspeed" --hostfile "$HOSTFILE" --module molf_ds.train "$@"
fi
exec "$BIN/deepspeed" --num_gpus "${NUM_GPUS:-2}" --master_port "${MASTER_PORT:-29500}" \
  --module molf_ds.train "$@"
