#!/usr/bin/env bash
# The test command: installs what is needed (idempotently), then runs the whole suite on CPU.
# Triton kernels run through Triton's interpreter when there is no GPU (tests/conftest.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
# One thread per process: several tests start worker processes on a 2-core machine, and torch's
# threads spinning against each other made single tests 20x slower when cores were shared.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider --durations=10 "$@"
