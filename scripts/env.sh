# Sourced by scripts/test and scripts/main-job: creates .venv when it is missing or incomplete
# (torch 2.13.0 first and alone — the CPU build on machines without a GPU — then the versions
# pinned in constraints.txt) and sets per-environment compile caches.
VENV="${MOLF_VENV:-.venv}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}"
export MOLF_DS_CACHE="${MOLF_DS_CACHE:-$PWD/$VENV/molf_ds_cache}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
if ! "$VENV/bin/python" -c "import molf_ds, torch, deepspeed, transformers, peft, pytest, mpi4py" \
    >/dev/null 2>&1 || [ ! -x "$VENV/bin/molf-train" ]; then
  echo "creating $VENV (one time, about a minute)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and alone: a plain `torch` requirement could pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
fi
