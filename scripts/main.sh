#!/usr/bin/env bash
# The main job: installs what is needed (idempotently), then runs `normlab reproduce` (the batch-size
# study, BN vs GN as the batch shrinks, on the handwritten-digits set) into ./normlab-out.
# Extra arguments go to `normlab reproduce` (e.g. --quick, or a study name).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec "$root/.venv/bin/normlab" reproduce "$@"
