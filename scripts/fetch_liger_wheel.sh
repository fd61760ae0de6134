#!/usr/bin/env bash
# Download the Liger-Kernel wheel that benchmarks/gpu_norm.py compares against into the ignored
# wheel folder .whl/ (the device has no package index; the device call carries ".whl").
#
#   bash scripts/fetch_liger_wheel.sh            # liger-kernel==0.8.5 (LigerGroupNormFunction's
#                                                # 0.8 signature is what gpu_norm.py calls)
#
# The wheel is pure Python (py3-none-any): --no-deps, since the device has torch and triton.
set -euo pipefail
version="${LIGER_VERSION:-0.8.5}"
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
mkdir -p "$root/.whl"
rm -f "$root"/.whl/liger_kernel-*.whl  # one version only: two would both be installed
"$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    -d "$root/.whl" "liger-kernel==$version"
ls -l "$root"/.whl/liger_kernel-*.whl
