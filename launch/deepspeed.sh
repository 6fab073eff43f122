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
# The launcher logs at molf-train's log_level= (from this command line): info and debug show its
# INFO lines (the command, the world, each rank spawned); at the default, warning, it logs errors
# only: its one warning is that a single-node run has no hostfile.
LAUNCHER_LOG_LEVEL=error
for arg in "$@"; do
  case "$arg" in
    log_level=info | log_level=debug) LAUNCHER_LOG_LEVEL="${arg#log_level=}" ;;
    log_level=*) LAUNCHER_LOG_LEVEL=error ;;
  esac
done
if [ -n "${HOSTFILE:-}" ]; then
  exec "$BIN/deepspeed" --log_level "$LAUNCHER_LOG_LEVEL" --hostfile "$HOSTFILE" \
    --module molf_ds.train "$@"
fi
exec "$BIN/deepspeed" --log_level "$LAUNCHER_LOG_LEVEL" --num_gpus "${NUM_GPUS:-2}" \
  --master_port "${MASTER_PORT:-29500}" --module molf_ds.train "$@"
