#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on the lent GPU machine. That machine has no network;
# its python3 (3.12) holds torch (CUDA), transformers, peft, accelerate, tqdm, pyyaml, ... but not
# DeepSpeed nor pydantic and hjson. Run here, once, with network (PyPI), from the repository root:
#   bench/gpu_wheels.sh                                  # -> .whl/  (CPython 3.12, manylinux x86_64)
#   PY_VERSION=3.11 WHEELS=.whl-py311 bench/gpu_wheels.sh   # the same for this machine's python
#                                                            # (bench/gpu_check.sh --dry-run)
# Versions are those of constraints.txt. DeepSpeed's wheel is built from its sdist (pure Python:
# its ops compile on first use); the rest are PyPI's wheels. `.whl*/` is git-ignored; name the
# folder in the device tool's `carry`. About 10 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PY_VERSION="${PY_VERSION:-3.12}"
WHEELS="${WHEELS:-.whl}"
# DeepSpeed's own requirements the image may lack, pydantic's, and pytest (bench/gpu_exactness.py
# imports the float64 reference from tests/test_optimizer_exactness.py).
PACKAGES=(
  hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
  einops msgpack ninja py-cpuinfo
  pytest pluggy iniconfig pygments
)

pinned() {  # NAME -> NAME==VERSION from constraints.txt ('-' and '_' alike), else NAME
  local pattern line
  pattern="^$(echo "$1" | sed 's/[-_]/[-_]/g')=="
  line="$(grep -i -E "$pattern" constraints.txt | head -n 1 || true)"
  echo "${line:-$1}"
}

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
"$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$(pinned deepspeed)"
specs=()
for name in "${PACKAGES[@]}"; do specs+=("$(pinned "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$WHEELS" "${specs[@]}"
ls "$WHEELS"
du -sh "$WHEELS"
