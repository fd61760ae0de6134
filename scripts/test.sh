#!/usr/bin/env bash
# The test command: installs what is needed (idempotently), then runs the whole suite on CPU.
# Triton kernels run through Triton's interpreter when there is no GPU (tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=10 "$@"
