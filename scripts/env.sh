# Sourced by scripts/test and scripts/main-job: creates .venv when it is missing or incomplete
# (torch 2.13.0 first and alone — the CPU build on machines without a GPU — then molf-ds[dev],
# i.e. the library, the training job's `train` extra and the test tools, at the versions pinned
# in constraints.txt) and sets per-environment compile caches.
VENV="${MOLF_VENV:-.venv}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/$VENV/torch_extensions}"
export MOLF_DS_CACHE="${MOLF_DS_CACHE:-$PWD/$VENV/molf_ds_cache}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
# Complete = molf-ds installed editable with its `dev` extra (which includes `train`): every
# distribution that extra names is findable (found, not imported: the check stays fast).
if ! "$VENV/bin/python" -c "
import importlib.util, sys
import molf_ds
modules = ('torch', 'deepspeed', 'transformers', 'peft', 'safetensors',  # molf-ds
           'datasets', 'tensorboard', 'matplotlib', 'tqdm', 'yaml', 'pydantic',  # [train]
           'accelerate',  # [hf]
           'pytest', 'xdist', 'hypothesis', 'ruff', 'mpi4py', 'trl')  # [dev]
sys.exit(any(importlib.util.find_spec(m) is None for m in modules))
" >/dev/null 2>&1 || [ ! -x "$VENV/bin/molf-train" ]; then
  echo "creating $VENV (one time, about a minute)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and alone: a plain `torch` requirement could pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev]"
fi
