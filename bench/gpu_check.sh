#!/usr/bin/env bash
# The GPU check: the one command to run when a GPU is lent. One JSON line per check on stdout
# (what each check measures: bench/gpu_check.py); under 8 minutes on one H200.
#
#   bench/gpu_wheels.sh                  # here, once, with network: .whl/ for the GPU machine
#   bench/gpu_check.sh                   # there, from the repository root, with .whl/ carried
#   bench/gpu_check.sh --dry-run         # a CPU machine: every step, small sizes (or DEVICE=cpu)
#
# The GPU machine has no network and lacks DeepSpeed, pydantic and hjson: the wheels in $WHEELS
# (default .whl/, made by bench/gpu_wheels.sh) are installed with --no-index into $SITE (default
# /tmp/molf-site), first on PYTHONPATH; nothing else is installed, the project runs from this
# checkout.
# For a dry run with this machine's python: PY_VERSION=3.11 WHEELS=.whl-py311 bench/gpu_wheels.sh,
# then PYTHON=.venv/bin/python WHEELS=.whl-py311 bench/gpu_check.sh --dry-run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/molf-torch-extensions}"
export MOLF_DS_CACHE="${MOLF_DS_CACHE:-/tmp/molf-ds-cache}"
started=$SECONDS
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  # Installed once per set of wheels: a rerun keeps the same files, so DeepSpeed's ops, compiled
  # from their sources there into $TORCH_EXTENSIONS_DIR, are not compiled again.
  SITE="${SITE:-/tmp/molf-site}"
  stamp="$(cd "$WHEELS" && ls -l -- *.whl | md5sum | cut -d' ' -f1)"
  if [ "$(cat "$SITE/.wheels" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check \
        --target "$SITE" "$WHEELS"/*.whl >&2; then
      echo '{"check": "setup", "ok": false, "error": "pip install of the carried wheels failed"}'
      exit 1
    fi
    echo "$stamp" > "$SITE/.wheels"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
else
  echo "no wheels in $WHEELS: using the python's own packages" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" -m bench.gpu_check --setup-s "$((SECONDS - started))" "$@"
