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
shared memory, registers / spill (local memory) bytes from ``cuobjdump -res-usage``, the
programs that fit on one SM at once (the tightest of the register file, shared memory, warp and
block limits of the target), and what the code does with memory: ``cp.async`` copies and
global loads and stores by vector width (counted in the PTX; ``LDGSTS``, the SASS form of
``cp.async``, from ``cuobjdump -sass``), and atomics. Per case it counts the launches of each
direction; ``--fold`` compiles the backward that sums its dw/db rows itself (``$NORMLAB_TRITON_FOLD``).
Counts are static (instructions in the code, not executions).

    python scripts/triton_aot_check.py [--arch 90] [--quick] [--csv FILE] [--backend FILE] [--fold]

``--backend FILE`` compiles another version of the backend module (an older
``triton_norm.py``, for before/after tables) in place of the installed one.

Exit status 0 when every variant compiled to a cubin, 1 otherwise (each failure is printed).
Needs the ``triton`` package and must run without ``TRITON_INTERPRET=1`` (the interpreter
replaces the compiler at import time).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_aot_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H100_SMS = 132  # the launch plan aims at 4 programs per SM (triton_norm._default_target_programs)
# sm_90 per-SM limits (CUDA occupancy rules): 64K 32-bit registers allocated per warp in units
# of 256, 228 KB shared memory (1 KB reserved per block), 64 warps, 32 blocks
SM90 = dict(regs=65536, reg_unit=256, smem=228 * 1024, smem_reserved=1024, warps=64, blocks=32)


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
     "2-D input (no spatial dims): LayerNorm over features, the rows backward"),
    ("LN features (rows, 4096) bf16", (8192, 4096), 1, False, "nchw", torch.bfloat16, None, True,
     "an LLM's LayerNorm: the widest row the rows backward takes (ROWS_MAX_C)"),
    ("GN 3-D CL3d fp16", (2, 64, 8, 16, 16), 16, False, "cl3d", torch.float16, "relu", True,
     "5-D channels_last_3d input"),
    ("GN 1-D fp32", (8, 64, 1000), 8, False, "nchw", torch.float32, "gelu", True,
     "3-D input (sequence)"),
]
# SD-UNet in channels_last (blocks of groups folded by the one-hot, split) and BN in
# channels_last (a column is a group; eval with given statistics too)
QUICK_CASES = [FULL_CASES[i] for i in (4, 7)]
# REFERENCE section 6 (docs/references.md): the GroupNorm (G = 32) shapes the device benchmarks time
REF6_CASES = [
    (f"ref6 {dt} {','.join(map(str, shape))} {fmt}", shape, 32, False, fmt,
     {"bf16": torch.bfloat16, "fp32": torch.float32}[dt], None, True, "REFERENCE section 6 (docs/references.md)")
    for dt, shape, fmt in (
        ("bf16", (2, 320, 64, 64), "nchw"), ("bf16", (2, 320, 64, 64), "cl"),
        ("bf16", (8, 320, 64, 64), "nchw"), ("bf16", (8, 320, 64, 64), "cl"),
        ("bf16", (8, 640, 32, 32), "cl"), ("bf16", (8, 1280, 16, 16), "cl"),
        ("bf16", (32, 256, 56, 56), "nchw"), ("bf16", (32, 256, 56, 56), "cl"),
        ("bf16", (2, 256, 56, 56), "cl"), ("bf16", (32, 2048, 7, 7), "cl"),
        ("fp32", (8, 320, 64, 64), "nchw"), ("fp32", (32, 256, 56, 56), "nchw"),
        ("fp32", (32, 256, 56, 56), "cl"))
]
# LayerNorm over the features of (rows, C): the rows backward
ROWS_CASES = [case for case in FULL_CASES if case[0].startswith("LN features")]
CASE_SETS = {"full": FULL_CASES, "quick": QUICK_CASES, "ref6": REF6_CASES, "rows": ROWS_CASES}


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


def programs_per_sm(regs: int, num_warps: int, shared: int, limits: dict = SM90) -> int:
    """Programs (CTAs) of one kernel resident on one SM at once."""
    per_warp = -(-max(regs, 1) * 32 // limits["reg_unit"]) * limits["reg_unit"]
    by_regs = limits["regs"] // (per_warp * num_warps)
    by_smem = limits["smem"] // (shared + limits["smem_reserved"])
    return max(0, min(by_regs, by_smem, limits["warps"] // num_warps, limits["blocks"]))


def memory_ops(ptx: str, sass: str) -> dict:
    """Static counts: cp.async (PTX) and LDGSTS (SASS); global loads/stores by width;
    atomics (the folded backward's arrival)."""
    copies = re.findall(r"\bcp\.async\.c[ag]\.shared\.global\S*\s*\[[^]]+\],\s*\[[^]]+\],"
                        r"\s*(0x[0-9a-f]+|\d+)", ptx)
    out = {"cp_async": len(copies), "cp_async_16B": sum(int(c, 0) >= 16 for c in copies),
           "ldgsts": len(re.findall(r"\bLDGSTS", sass)) if sass else "",
           "atomics": len(re.findall(r"\batom\.", ptx))}
    for op in ("ld", "st"):
        found = re.findall(rf"\b{op}\.global(?:\.[a-zL0-9:_]+)*?(\.v[248])?\.(?:b|f|u|s)(8|16|32|64)\b",
                           ptx)
        widths = [(int(v[2:]) if v else 1) * int(bits) // 8 for v, bits in found]
        out[f"{op}_global"] = len(widths)
        out[f"{op}_16B"] = sum(w >= 16 for w in widths)
        out[f"{op}_max_bytes"] = max(widths, default=0)
    return out


def _sass(cubin: bytes, cuobjdump: Path) -> str:
    if not cuobjdump.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True,
                              text=True).stdout


def _load_backend(path: Optional[Path]):
    if path is None:
        from normlab.backends import triton_norm
        return triton_norm
    spec = importlib.util.spec_from_file_location("normlab_backend_under_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _run_case(tn, x, w, b, g, over_batch, a, launches):
    """Both directions through the launchers, counting the launches of each."""
    launches["dir"] = "fwd"
    out = tn._launch_fwd(x, w, b, g, over_batch, 1e-5, a)
    counters = {}
    if len(out) == 2:  # statistics in one buffer: rows mean, rstd, var, shifted mean (, 0)
        smean, rstd = out[1][3], out[1][1]
        if out[1].shape[0] == 5:  # row 4: the backward's arrival counters (FOLD 2)
            counters = {"counters": out[1][4]}
    else:  # the older five outputs (y, mean, rstd, var, shifted mean)
        smean, rstd = out[4], out[2]
    launches["dir"] = "bwd"
    tn._launch_bwd(torch.empty_like(x), x, w, b, smean, rstd, None, g, over_batch, 1e-5, a,
                   **counters)
    c = x.shape[1]
    if over_batch and g == c:  # BN eval and its backward: given per-channel statistics
        stats = torch.empty(c, dtype=torch.float32)
        launches["dir"] = "fixed_fwd"
        tn._launch_fixed(x, stats, stats, w, b, 1e-5, a)
        launches["dir"] = "fixed_bwd"
        tn._launch_bwd(torch.empty_like(x), x, w, b, stats, stats, stats, c, True, 1e-5, a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90)")
    ap.add_argument("--quick", action="store_true", help="two cases: the blocked channels_last paths, every stage")
    ap.add_argument("--cases", choices=sorted(CASE_SETS), default="full",
                    help="case set (default full; --quick means quick)")
    ap.add_argument("--csv", type=Path, default=None, help="write one row per compiled variant")
    ap.add_argument("--backend", type=Path, default=None,
                    help="compile this version of backends/triton_norm.py instead")
    ap.add_argument("--fold", action="store_true",
                    help="the fused backward sums its dw/db rows itself (TUNING fold_rows)")
    args = ap.parse_args(argv)

    driver.set_active(CompileOnlyDriver(args.arch))
    tn = _load_backend(args.backend)

    # the launch plan a GPU of H100 size gets (on CPU tensors the plan is the interpreter's)
    tn.TUNING.update(target_programs=4 * H100_SMS,
                     block_elems=getattr(tn, "GPU_BLOCK_ELEMS", 4096))
    if "num_stages" in tn.TUNING:  # a GPU's pipelining depth (absent in older versions)
        tn.TUNING["num_stages"] = tn.GPU_NUM_STAGES
    if args.fold:
        if "fold_rows" not in tn.TUNING:
            sys.exit("triton_aot_check: --fold needs a backend with TUNING['fold_rows']")
        tn.TUNING["fold_rows"] = True

    compiled: dict = {}
    current = {"case": ""}
    launches: dict = {"dir": "", "count": {}}
    original_run = JITFunction.run

    def compile_only(self, *a, grid, warmup, **kw):
        key = (current["case"], launches["dir"])
        launches["count"][key] = launches["count"].get(key, 0) + 1
        t0 = time.perf_counter()
        kernel = original_run(self, *a, grid=grid, warmup=True, **kw)
        # compile-time constants, positional (Cg) or keyword (STAGE, BLOCK_R, ...)
        consts = {}
        for i in self.constexprs:
            name = self.arg_names[i]
            consts[name] = a[i] if i < len(a) else kw.get(name)
        if (current["case"], kernel.hash) not in compiled:  # one row per variant and case
            compiled[(current["case"], kernel.hash)] = dict(
                case=current["case"], kernel=self.fn.__name__, dtype=str(a[0].dtype),
                num_warps=kw.get("num_warps", 4), consts=consts, kernel_obj=kernel,
                seconds=round(time.perf_counter() - t0, 2))
        return kernel

    JITFunction.run = compile_only
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    failures = []
    cases = QUICK_CASES if args.quick else CASE_SETS[args.cases]
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
            _run_case(tn, x, w, b, g, over_batch, a, launches)
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
        mem = memory_ops(k.asm.get("ptx", ""), _sass(cubin, cuobjdump))
        count = launches["count"]
        rows.append(dict(
            triton=triton.__version__, target=f"sm_{args.arch}", case=info["case"],
            kernel=info["kernel"], dtype=info["dtype"], cg=consts.get("Cg", ""),
            gb=consts.get("GB", ""),
            stage=consts.get("STAGE", ""), over_batch=consts.get("OVER_BATCH", ""),
            act=consts.get("ACT", ""), block_r=consts.get("BLOCK_R", ""),
            block_c=consts.get("BLOCK_C", consts.get("BLOCK", "")),
            num_warps=info["num_warps"], shared_bytes=k.metadata.shared,
            num_stages=consts.get("NUM_STAGES", ""), center=consts.get("CENTER", ""),
            fold=consts.get("FOLD", ""),
            regs=usage.get("regs", ""), local_bytes=usage.get("local", ""),
            programs_per_sm=(programs_per_sm(usage["regs"], info["num_warps"], k.metadata.shared)
                             if "regs" in usage else ""),
            **mem,
            launches_fwd=count.get((info["case"], "fwd"), 0),
            launches_bwd=count.get((info["case"], "bwd"), 0),
            cubin_bytes=len(cubin), compile_s=info["seconds"],
        ))
    print(f"\n{len(rows)} variants compiled to cubin")
    print(f"{'kernel':20s} {'dtype':15s} {'Cg':>4s} {'GB':>3s} {'stage':>5s} {'R x C':>10s} {'warps':>5s} "
          f"{'smem':>6s} {'regs':>4s} {'spill':>5s} {'/SM':>3s} {'cp.as':>5s} {'ld16B':>5s} "
          f"{'ld':>4s} {'st16B':>5s} {'st':>4s} {'fwd':>3s} {'bwd':>3s}")
    for r in rows:
        print(f"{r['kernel']:20s} {r['dtype']:15s} {str(r['cg']):>4s} {str(r['gb']):>3s} "
              f"{str(r['stage']):>5s} "
              f"{str(r['block_r']) + 'x' + str(r['block_c']):>10s} {r['num_warps']:>5d} "
              f"{r['shared_bytes']:>6d} {str(r['regs']):>4s} {str(r['local_bytes']):>5s} "
              f"{str(r['programs_per_sm']):>3s} {r['cp_async']:>5d} {r['ld_16B']:>5d} "
              f"{r['ld_global']:>4d} {r['st_16B']:>5d} {r['st_global']:>4d} "
              f"{r['launches_fwd']:>3d} {r['launches_bwd']:>3d}")
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
