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
# One pytest worker per core (pytest-xdist), each taking whole test files, so a file's
# module-scoped fixtures (a two-process DDP run, the GPU session's dry run) run once. On 2 cores
# this halves the time (14 min 11 s -> 7 min 11 s). `-n 0` after the script runs one process.
exec "$root/.venv/bin/python" -m pytest -q -p no:cacheprovider -n auto --dist loadfile \
    --durations=10 "$@"
