"""Compile every Triton kernel variant normlab launches for a real GPU target, without a GPU.

The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute, but the interpreter
never runs Triton's compiler: a kernel can pass them and still fail to compile for a GPU (a
type the code generator refuses, a block too large for shared memory), or compile into a slow
kernel (registers spilled to local memory). This script runs normlab's launchers on CPU tensors
with a stand-in driver that reports a CUDA target (sm_90, the H100, by default) and turns every
launch into an ahead-of-time compile (``warmup``): TTIR -> TTGIR -> LLVM IR -> PTX -> cubin,
with the ptxas that ships in the Triton wheel. Nothing runs, so the outputs are garbage and are
never read.

For each distinct compiled variant it reports the kernel, its compile-time constants, warps,
shared memory, and registers / spill (local memory) bytes from ``cuobjdump -res-usage``.

    python scripts/triton_aot_check.py [--arch 90] [--quick] [--csv FILE]

Exit status 0 when every variant compiled to a cubin, 1 otherwise (each failure is printed).
Needs the ``triton`` package and must run without ``TRITON_INTERPRET=1`` (the interpreter
replaces the compiler at import time).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H100_SMS = 132  # the launch plan aims at 4 programs per SM (triton_norm._default_target_programs)


class CompileOnlyDriver:
    """The part of Triton's driver interface the JIT asks for before compiling (no device)."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


# (label, shape, groups, over_batch, memory format, dtype, activation, affine, why this case)
FULL_CASES = [
    ("rn50 GN32 C=256 NCHW bf16", (8, 256, 56, 56), 32, False, "nchw", torch.bfloat16, None, True,
     "ResNet-50 stage 1 in NCHW: Cg = 8, one group per program"),
    ("rn50 GN32 C=256 CL bf16", (8, 256, 56, 56), 32, False, "cl", torch.bfloat16, None, True,
     "the same in channels_last: blocks of 2 groups, 32-byte tile rows"),
    ("rn50 GN32 C=2048 CL bf16", (8, 2048, 7, 7), 32, False, "cl", torch.bfloat16, None, True,
     "ResNet-50 stage 4: Cg = 64, small spatial"),
    ("rn50 GN32 C=64 NCHW fp32 N=1", (1, 64, 112, 112), 32, False, "nchw", torch.float32, None, True,
     "N*G = 32 below the SM count: split reduction (STAGE 1/2)"),
    ("sd GN32 C=320 CL fp16 silu", (2, 320, 64, 64), 32, False, "cl", torch.float16, "silu", True,
     "SD-UNet: Cg = 10 (20-byte rows) in blocks of 2 groups, fused SiLU, split"),
    ("sd GN32 C=640 NCHW bf16 silu", (2, 640, 32, 32), 32, False, "nchw", torch.bfloat16, "silu", True,
     "SD-UNet: Cg = 20 in NCHW"),
    ("sd GN32 C=1280 CL bf16 gelu", (2, 1280, 16, 16), 32, False, "cl", torch.bfloat16, "gelu", True,
     "Cg = 40, fused exact GELU (erf)"),
    ("BN C=256 CL bf16 relu", (8, 256, 28, 28), 256, True, "cl", torch.bfloat16, "relu", True,
     "BN training in channels_last: 64 channels (a 128-byte line) per program, fused ReLU"),
    ("BN C=64 NCHW fp32", (32, 64, 32, 32), 64, True, "nchw", torch.float32, None, True,
     "BN NCHW fp32, split over the batch (64 statistics)"),
    ("BGN G=8 C=64 NCHW fp16", (16, 64, 16, 16), 8, True, "nchw", torch.float16, None, True,
     "batch-group norm (over_batch with 1 < G < C)"),
    ("LN G=1 C=96 CL fp32", (4, 96, 56, 56), 1, False, "cl", torch.float32, None, True,
     "LN conv form: one group of 96 channels, several column tiles"),
    ("IN C=64 NCHW bf16 no affine", (4, 64, 32, 32), 64, False, "nchw", torch.bfloat16, None, False,
     "IN: Cg = 1, no weight and bias (HAS_W = HAS_B = False)"),
    ("LN features (rows, 768) bf16", (4096, 768), 1, False, "nchw", torch.bfloat16, None, True,
     "2-D input (no spatial dims): LayerNorm over features"),
    ("GN 3-D CL3d fp16", (2, 64, 8, 16, 16), 16, False, "cl3d", torch.float16, "relu", True,
     "5-D channels_last_3d input"),
    ("GN 1-D fp32", (8, 64, 1000), 8, False, "nchw", torch.float32, "gelu", True,
     "3-D input (sequence)"),
]
# SD-UNet in channels_last (blocks of groups folded by the one-hot, split) and BN in
# channels_last (a column is a group; eval with given statistics too)
QUICK_CASES = [FULL_CASES[i] for i in (4, 7)]


def _make(shape, fmt, dtype):
    x = torch.empty(shape, dtype=dtype)
    if fmt == "cl":
        x = x.to(memory_format=torch.channels_last)
    elif fmt == "cl3d":
        x = x.to(memory_format=torch.channels_last_3d)
    return x


def _resource_usage(cubin: bytes, cuobjdump: Path) -> dict:
    if not cuobjdump.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        return {}
    return dict(zip(("regs", "stack", "shared_static", "local"), map(int, m.groups())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90)")
    ap.add_argument("--quick", action="store_true", help="two cases: the blocked channels_last paths, every stage")
    ap.add_argument("--csv", type=Path, default=None, help="write one row per compiled variant")
    args = ap.parse_args(argv)

    driver.set_active(CompileOnlyDriver(args.arch))
    from normlab.backends import triton_norm as tn

    # the launch plan a GPU of H100 size gets (on CPU tensors the plan is the interpreter's)
    tn.TUNING.update(target_programs=4 * H100_SMS, block_elems=4096)

    compiled: dict = {}
    current = {"case": ""}
    original_run = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        t0 = time.perf_counter()
        kernel = original_run(self, *a, grid=grid, warmup=True, **kw)
        # compile-time constants, positional (Cg) or keyword (STAGE, BLOCK_R, ...)
        consts = {}
        for i in self.constexprs:
            name = self.arg_names[i]
            consts[name] = a[i] if i < len(a) else kw.get(name)
        if kernel.hash not in compiled:
            compiled[kernel.hash] = dict(
                case=current["case"], kernel=self.fn.__name__, dtype=str(a[0].dtype),
                num_warps=kw.get("num_warps", 4), consts=consts, kernel_obj=kernel,
                seconds=round(time.perf_counter() - t0, 2))
        return kernel

    JITFunction.run = compile_only
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    failures = []
    cases = QUICK_CASES if args.quick else FULL_CASES
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}; "
          f"{len(cases)} cases")
    for label, shape, g, over_batch, fmt, dtype, act, affine, why in cases:
        current["case"] = label
        x = _make(shape, fmt, dtype)
        c = shape[1]
        w = torch.empty(c, dtype=torch.float32) if affine else None
        b = torch.empty(c, dtype=torch.float32) if affine else None
        a = act or "none"
        try:
            y, mean, rstd, var, smean = tn._launch_fwd(x, w, b, g, over_batch, 1e-5, a)
            tn._launch_bwd(torch.empty_like(x), x, w, b, smean, rstd, None, g, over_batch, 1e-5,
                           a)
            if over_batch and g == c:  # BN eval and its backward: given per-channel statistics
                stats = torch.empty(c, dtype=torch.float32)
                tn._launch_fixed(x, stats, stats, w, b, 1e-5, a)
                tn._launch_bwd(torch.empty_like(x), x, w, b, stats, stats, stats, c, True, 1e-5, a)
        except Exception as e:  # a compile error: report it, go on with the other cases
            failures.append((label, e))
            print(f"FAIL  {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            traceback.print_exc(limit=3)
            continue
        print(f"ok    {label:34s} ({why})")
    JITFunction.run = original_run

    rows = []
    for info in compiled.values():
        k = info["kernel_obj"]
        cubin = k.asm.get("cubin", b"")
        usage = _resource_usage(cubin, cuobjdump)
        consts = info["consts"]
        rows.append(dict(
            triton=triton.__version__, target=f"sm_{args.arch}", case=info["case"],
            kernel=info["kernel"], dtype=info["dtype"], cg=consts.get("Cg", ""),
            gb=consts.get("GB", ""),
            stage=consts.get("STAGE", ""), over_batch=consts.get("OVER_BATCH", ""),
            act=consts.get("ACT", ""), block_r=consts.get("BLOCK_R", ""),
            block_c=consts.get("BLOCK_C", consts.get("BLOCK", "")),
            num_warps=info["num_warps"], shared_bytes=k.metadata.shared,
            regs=usage.get("regs", ""), local_bytes=usage.get("local", ""),
            cubin_bytes=len(cubin), compile_s=info["seconds"],
        ))
    print(f"\n{len(rows)} variants compiled to cubin")
    print(f"{'kernel':20s} {'dtype':15s} {'Cg':>4s} {'GB':>3s} {'stage':>5s} {'R x C':>10s} {'warps':>5s} "
          f"{'smem':>6s} {'regs':>4s} {'spill':>5s}")
    for r in rows:
        print(f"{r['kernel']:20s} {r['dtype']:15s} {str(r['cg']):>4s} {str(r['gb']):>3s} "
              f"{str(r['stage']):>5s} "
              f"{str(r['block_r']) + 'x' + str(r['block_c']):>10s} {r['num_warps']:>5d} "
              f"{r['shared_bytes']:>6d} {str(r['regs']):>4s} {str(r['local_bytes']):>5s}")
    spills = [r for r in rows if r["local_bytes"] not in ("", 0)]
    if spills:
        print(f"\n{len(spills)} variants spill registers to local memory")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
        print(f"wrote {args.csv}")
    if failures:
        print(f"\n{len(failures)} of {len(cases)} cases failed to compile", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
