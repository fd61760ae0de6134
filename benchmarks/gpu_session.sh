#!/usr/bin/env bash
# Everything a lent GPU session runs, in one or two device calls (each at most 10 minutes).
#
#   bash benchmarks/gpu_session.sh check     # environment, GPU tests, a short kernel benchmark (<= 8 min)
#   bash benchmarks/gpu_session.sh bench     # the REFERENCE section 6 kernel set + ResNet-50 step (<= 9 min)
#
# Run through the device tool from the repository root. It writes under $OUT (the device tool
# returns that folder; locally: benchmarks/results/session-<time>): env.txt, tests.log, the
# benchmarks' CSV/JSON and logs. Copy the CSV/JSON you keep to benchmarks/results/ and record
# floor, prediction and measurement in benchmarks/NOTES.md.
#
# Liger-Kernel (a pure-Python wheel; the device has no package index) is used when a wheel is
# carried in .whl/ (`pip download liger-kernel --no-deps -d .whl` here, then carry ".whl").
# Nothing is installed into the device's Python: normlab is put on PYTHONPATH, Liger into a
# private folder.
set -u
part="${1:-check}"
case "$part" in check|bench) ;; *) echo "usage: $0 check|bench" >&2; exit 2 ;; esac

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 2
out="${OUT:-$root/benchmarks/results/session-$(date -u +%Y%m%dT%H%M%S)}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a run killed by its timeout still leaves its log
unset TRITON_INTERPRET
# Time budgets (seconds; one device call runs at most 600): each Python step starts no new case
# after its --time-budget and is killed by `timeout` some way after that (pytest by SIGINT, so
# that it prints its summary). check: 270 + 170 + ~20; bench: 310 + 200 + ~20.
# The device tool returns at most 8 files from $OUT: check writes 5 (env.txt, tests.log,
# gpu_norm_check.log, gpu_norm_*.csv/.json), bench 7: run the two parts in separate calls.

if ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
    liger_dir="$(mktemp -d)"
    if "$py" -m pip install -q --no-deps --no-index --no-compile --target "$liger_dir" \
            .whl/liger_kernel-*.whl; then
        export PYTHONPATH="$PYTHONPATH:$liger_dir"
    else
        echo "Liger-Kernel wheel did not install: liger is left out (meta.unavailable)" >&2
    fi
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
    "$py" - <<'EOF'
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(p.name, p.multi_processor_count, "SMs", getattr(p, "L2_cache_size", 0) // 2**20, "MiB L2")
for mod in ("liger_kernel", "torchvision", "timm"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "available"))
    except Exception as e:  # noqa: BLE001
        print(mod, "not available:", type(e).__name__)
try:
    from normlab.backends import resolve_backend
    x = torch.empty(2, 64, 8, 8, device="cuda", dtype=torch.bfloat16)
    print("normlab auto backend, CUDA bf16:", resolve_backend(None, x, 32, False, None).name)
except Exception as e:  # noqa: BLE001
    print("normlab backend check failed:", type(e).__name__, e)
EOF
} 2>&1 | tee "$out/env.txt"

status=0
if [ "$part" = check ]; then
    # every test that uses the GPU: Triton kernels on CUDA (same tests as the interpreter runs),
    # auto -> triton selection, inductor fullgraph, CUDA-graph fwd+bwd, modules, functional.
    # No -x: one failure must not hide the others. On a cold Triton cache every kernel variant
    # compiles once (about a second each); the randomized test alone brings ~150 variants, so it
    # runs second, on what is left of the time, and cannot crowd out the GPU-only tests.
    timeout -s INT -k 20 190 "$py" -m pytest -q -p no:cacheprovider -rfE --durations=10 \
        -k "not randomized" tests/backends tests/test_compile.py tests/nn \
        tests/test_functional.py tests/test_spp.py > "$out/tests.log" 2>&1 || status=1
    tail -25 "$out/tests.log"
    timeout -s INT -k 10 80 "$py" -m pytest -q -p no:cacheprovider -rfE \
        -k "randomized" tests/backends > "$out/tests_randomized.log" 2>&1 || status=1
    tail -8 "$out/tests_randomized.log"
    # a short kernel run: the first 8 bf16 REFERENCE rows, every impl, eager and graph replay
    timeout -k 10 170 "$py" benchmarks/gpu_norm.py --dtypes bf16 --max-cases 8 \
        --time-budget 110 --out "$out" > "$out/gpu_norm_check.log" 2>&1 || status=1
    tail -40 "$out/gpu_norm_check.log"
else
    timeout -k 10 310 "$py" benchmarks/gpu_norm.py --set ref6 --time-budget 250 --out "$out" \
        > "$out/gpu_norm.log" 2>&1 || status=1
    tail -25 "$out/gpu_norm.log"
    timeout -k 10 200 "$py" benchmarks/resnet50_step.py --batches 8 64 128 --steps 20 \
        --warmup 5 --time-budget 150 --out "$out" > "$out/resnet50_step.log" 2>&1 || status=1
    tail -12 "$out/resnet50_step.log"
fi
echo "results in $out (exit $status)"
exit $status
