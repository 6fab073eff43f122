#!/usr/bin/env bash
# molf-train under MPI: ranks, world size and the rendezvous come from mpi4py.
#   launch/mpirun.sh [--config FILE] [key=value ...]              # NUM_GPUS ranks (default 2)
# Needs mpi4py and an MPI (`pip install mpi4py mpich` puts mpiexec in the venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$PWD/.venv/bin/python}"
BIN="$(dirname "$PY")"
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec "$BIN/mpiexec" -n "${NUM_GPUS:-2}" "$PY" -m molf_ds.train "$@"
