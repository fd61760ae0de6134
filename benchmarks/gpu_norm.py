"""GPU benchmark of GroupNorm-family kernels against the memory-bandwidth floor (issue 3).

Wu & He, "Group Normalization" (ECCV 2018) is the operator; the question here is only speed.
For every shape (REFERENCE section 6 plus N = 1..32, SD-UNet and ResNet-50 activations), layout
(NCHW, channels_last), dtype (bf16, fp32) and mode (forward, forward+backward), each
implementation is timed eagerly and as a CUDA-graph replay:

* ``torch``          F.group_norm (eager ATen)
* ``torch_compile``  torch.compile(F.group_norm)
* ``liger``          Liger-Kernel's GroupNorm, if importable
* ``normlab``        normlab.functional.group_norm(..., backend="triton")
* ``normlab_noblock`` the same with one group per program in every layout (the v1 plan; A/B
  for the blocked channels_last path, benchmarks/NOTES.md v2)
* ``torch_bn``       F.batch_norm in training mode (the cost GN should match)
* ``normlab_bn``     normlab's BatchNorm on the Triton backend (checked against torch_bn)

Floor model (minimal bytes / measured copy bandwidth): forward reads x and writes y (2 passes
over the activation), forward+backward adds reading dy and x and writing dx (5 passes).
Parameters and statistics are ignored (< 0.1% of the bytes for every shape here). The copy
bandwidth is measured on the device (a 1 GiB device-to-device copy, bytes read + written).

Inputs that fit in L2 are rotated over several buffers (>= 4x the L2 size in all) so that the
numbers measure DRAM, not the cache; the time reported is per call.

Usage (on a CUDA machine)::

    python benchmarks/gpu_norm.py                    # the REFERENCE section 6 set
    python benchmarks/gpu_norm.py --set full         # + N sweep, SD-UNet, ResNet-50 shapes
    python benchmarks/gpu_norm.py --impls torch normlab --modes fwd --no-graph

Writes ``benchmarks/results/gpu_norm_<device>_<time>.csv`` and ``.json`` (or ``--out DIR``).
Without CUDA it prints why and exits with status 2; ``--list`` prints the shape table and the
floor bytes without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PASSES = {"fwd": 2, "fwdbwd": 5}  # passes over the activation tensor in the floor model


# --------------------------------------------------------------------------------------------
# shape tables and the byte-count floor (CPU-only, tested)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    family: str  # "ref6" (REFERENCE section 6), "sd-unet", "resnet50", "n-sweep"
    n: int
    c: int
    h: int
    w: int
    groups: int
    layout: str  # "nchw" or "nhwc" (channels_last)
    dtype: str  # "bf16", "fp32", "fp16"

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w

    def floor_bytes(self, mode: str) -> int:
        """Fewest bytes the mode must move: PASSES[mode] passes over the activation."""
        return PASSES[mode] * self.numel * ELEM_BYTES[self.dtype]


# REFERENCE section 6: (dtype, shape, layout) measured on an H100 with torch 2.11
REF6 = [
    ("bf16", (2, 320, 64, 64), "nchw"), ("bf16", (2, 320, 64, 64), "nhwc"),
    ("bf16", (8, 320, 64, 64), "nchw"), ("bf16", (8, 320, 64, 64), "nhwc"),
    ("bf16", (8, 640, 32, 32), "nhwc"), ("bf16", (8, 1280, 16, 16), "nhwc"),
    ("bf16", (32, 256, 56, 56), "nchw"), ("bf16", (32, 256, 56, 56), "nhwc"),
    ("bf16", (2, 256, 56, 56), "nhwc"), ("bf16", (32, 2048, 7, 7), "nhwc"),
    ("fp32", (8, 320, 64, 64), "nchw"), ("fp32", (32, 256, 56, 56), "nchw"),
    ("fp32", (32, 256, 56, 56), "nhwc"),
]
# Stable Diffusion U-Net GroupNorm inputs (C, H, W) at 512x512 (latent 64x64), G = 32
SD_UNET = [(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8), (960, 32, 32)]
# ResNet-50 normalization inputs (C, H, W) at 224x224, G = 32
RESNET50 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28),
            (256, 14, 14), (1024, 14, 14), (512, 7, 7), (2048, 7, 7)]
N_SWEEP = (1, 2, 4, 8, 16, 32)


def build_cases(which: str = "ref6", dtypes: Sequence[str] = ("bf16", "fp32"),
                layouts: Sequence[str] = ("nchw", "nhwc"), groups: int = 32) -> List[Case]:
    """The benchmark shape set. ``ref6``: REFERENCE section 6 exactly; ``full``: ref6 plus every
    SD-UNet and ResNet-50 shape at N in N_SWEEP for each dtype and layout. Duplicates dropped."""
    if which not in ("ref6", "full"):
        raise ValueError(f"unknown case set {which!r}; expected 'ref6' or 'full'")
    cases: List[Case] = []
    for dt, (n, c, h, w), layout in REF6:
        if dt in dtypes and layout in layouts:
            cases.append(Case("ref6", n, c, h, w, groups, layout, dt))
    if which == "full":
        for family, table in (("sd-unet", SD_UNET), ("resnet50", RESNET50)):
            for (c, h, w) in table:
                for n in N_SWEEP:
                    for dt in dtypes:
                        for layout in layouts:
                            cases.append(Case(family, n, c, h, w, groups, layout, dt))
    seen, unique = set(), []
    for case in cases:
        key = (case.shape, case.layout, case.dtype, case.groups)
        if key not in seen:
            seen.add(key)
            unique.append(case)
    return unique


def floor_us(case: Case, mode: str, copy_gbps: float) -> float:
    """Floor time in microseconds at ``copy_gbps`` (GB/s, bytes read + written)."""
    return case.floor_bytes(mode) / (copy_gbps * 1e9) * 1e6


def rotation_count(tensor_bytes: int, l2_bytes: int, cap: int = 16) -> int:
    """Buffers to rotate over so that the working set is >= 4x L2 (1 for tensors already big)."""
    if tensor_bytes <= 0:
        raise ValueError(f"tensor_bytes must be positive, got {tensor_bytes}")
    return max(1, min(cap, math.ceil(4 * l2_bytes / tensor_bytes)))


# --------------------------------------------------------------------------------------------
# implementations (GPU only)
# --------------------------------------------------------------------------------------------


def _liger_group_norm() -> Optional[Callable]:
    try:  # Liger-Kernel is optional (a pure-Python wheel carried to the device)
        from liger_kernel.ops.group_norm import LigerGroupNormFunction
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None

    def liger(x, w, b, groups, eps=1e-5):
        return LigerGroupNormFunction.apply(x, w, b, x.shape[1], groups, eps)

    return liger


def make_impls(names: Iterable[str]) -> Dict[str, Callable]:
    """name -> f(x, weight, bias, groups) for the implementations that exist here."""
    import normlab.functional as NF

    impls: Dict[str, Callable] = {}
    for name in names:
        if name == "torch":
            impls[name] = lambda x, w, b, g: F.group_norm(x, g, w, b, 1e-5)
        elif name == "torch_compile":
            compiled = torch.compile(lambda x, w, b, g: F.group_norm(x, g, w, b, 1e-5),
                                     dynamic=False)
            impls[name] = compiled
        elif name == "liger":
            liger = _liger_group_norm()
            if liger is not None:
                impls[name] = lambda x, w, b, g, _f=liger: _f(x, w, b, g)
        elif name == "normlab":
            impls[name] = lambda x, w, b, g: NF.group_norm(x, g, w, b, 1e-5, backend="triton")
        elif name == "normlab_noblock":
            # the same kernels with one group per program in every layout (v1's channels_last)
            from normlab.backends import triton_norm as tn

            def noblock(x, w, b, g, _tn=tn):
                _tn.TUNING["group_blocks"] = False
                try:
                    return NF.group_norm(x, g, w, b, 1e-5, backend="triton")
                finally:
                    _tn.TUNING["group_blocks"] = True

            impls[name] = noblock
        elif name == "normlab_bn":
            impls[name] = lambda x, w, b, g: NF.batch_norm(x, None, None, w, b, True, 0.1, 1e-5,
                                                           backend="triton")
        elif name == "torch_bn":
            impls[name] = lambda x, w, b, g: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
        else:
            raise ValueError(f"unknown implementation {name!r}")
    return impls


def measure_copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written), median of do_bench."""
    from triton.testing import do_bench

    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _inputs(case: Case, count: int):
    dtype = DTYPES[case.dtype]
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    xs, dys = [], []
    for _ in range(count):
        x = (torch.randn(case.shape, device="cuda") * 2 + 0.5).to(dtype)
        xs.append(x.contiguous(memory_format=fmt).requires_grad_())
        dys.append(torch.randn(case.shape, device="cuda").to(dtype).contiguous(memory_format=fmt))
    w = (torch.randn(case.c, device="cuda") * 0.5 + 1).requires_grad_()
    b = torch.randn(case.c, device="cuda").requires_grad_()
    return xs, dys, w, b


def _step(fn, xs, dys, w, b, groups, mode):
    """One timed unit: the op (and its backward) over every rotation buffer."""
    def run():
        for x, dy in zip(xs, dys):
            y = fn(x, w, b, groups)
            if mode == "fwdbwd":
                torch.autograd.grad(y, (x, w, b), dy)
    return run


def _time_ms(run: Callable[[], None], graph: bool) -> float:
    from triton.testing import do_bench

    if not graph:
        return do_bench(run, warmup=25, rep=200, return_mode="median")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream before capture
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return do_bench(g.replay, warmup=25, rep=200, return_mode="median")


def _check(case: Case, impl: Callable, ref: Callable) -> float:
    """Relative error of impl vs torch computed in float64 (forward and dx), on fresh data."""
    xs, dys, w, b = _inputs(case, 1)
    x, dy = xs[0], dys[0]
    y = impl(x, w, b, case.groups)
    (dx,) = torch.autograd.grad(y, (x,), dy)
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64, w.detach().double(), b.detach().double(), case.groups)
    (dx64,) = torch.autograd.grad(y64, (x64,), dy.double())
    err_y = ((y.double() - y64).norm() / y64.norm()).item()
    err_dx = ((dx.double() - dx64).norm() / dx64.norm()).item()
    return max(err_y, err_dx)


def run_benchmarks(cases: List[Case], impl_names: Sequence[str], modes: Sequence[str],
                   graphs: Sequence[bool], copy_gbps: float, l2_bytes: int,
                   on_case: Optional[Callable[[List[dict]], None]] = None) -> List[dict]:
    """Time every (case, impl, mode, graph); ``on_case(rows so far)`` after each case."""
    impls = make_impls(impl_names)
    torch_ref = lambda x, w, b, g: F.group_norm(x, g, w, b, 1e-5)  # noqa: E731
    bn_ref = lambda x, w, b, g: F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)  # noqa: E731
    rows = []
    for case in cases:
        rot = rotation_count(case.numel * ELEM_BYTES[case.dtype], l2_bytes)
        xs, dys, w, b = _inputs(case, rot)
        for name, fn in impls.items():
            err = None
            if name != "torch_bn":
                try:
                    err = _check(case, fn, bn_ref if name == "normlab_bn" else torch_ref)
                except Exception as e:  # noqa: BLE001 - record, keep benchmarking
                    err = f"error: {type(e).__name__}: {e}"[:200]
            for mode in modes:
                for graph in graphs:
                    try:
                        ms = _time_ms(_step(fn, xs, dys, w, b, case.groups, mode), graph) / rot
                        status = "ok"
                    except Exception as e:  # noqa: BLE001
                        ms, status = float("nan"), f"error: {type(e).__name__}: {e}"[:200]
                    fl = floor_us(case, mode, copy_gbps)
                    us = ms * 1e3
                    rows.append(dict(
                        **asdict(case), impl=name, mode=mode, graph=graph, rotate=rot,
                        time_us=us, gbps=case.floor_bytes(mode) / (us * 1e-6) / 1e9,
                        floor_us=fl, frac_of_floor=fl / us, rel_err=err, status=status,
                    ))
                    print(f"{case.family:8s} {str(case.shape):20s} {case.layout} {case.dtype} "
                          f"{name:13s} {mode:6s} graph={int(graph)} {us:9.1f} us "
                          f"({100 * fl / us:5.1f}% of floor) {status}", flush=True)
        del xs, dys
        torch.cuda.empty_cache()
        if on_case is not None:
            on_case(rows)
    return rows


def result_base(meta: dict, out_dir: str) -> str:
    """``OUT/gpu_norm_<device>_<utc time>`` (the .csv and .json share it)."""
    os.makedirs(out_dir, exist_ok=True)
    dev = meta["device"].replace(" ", "_").replace("/", "_")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(out_dir, f"gpu_norm_{dev}_{stamp}")


def write_results(rows: List[dict], meta: dict, base: str) -> Tuple[str, str]:
    """(Re)write ``base``.csv and .json with every row so far: called after each case, so a
    run stopped by a time limit keeps what it measured (``meta['complete']`` says whether it
    finished)."""
    with open(base + ".csv", "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return base + ".csv", base + ".json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="ref6", choices=("ref6", "full"))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"], choices=("nchw", "nhwc"))
    p.add_argument("--impls", nargs="+",
                   default=["torch", "torch_compile", "liger", "normlab", "normlab_noblock",
                            "torch_bn", "normlab_bn"])
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=sorted(PASSES))
    p.add_argument("--no-graph", action="store_true", help="eager timings only")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--list", action="store_true", help="print the cases and floor bytes, exit")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    cases = build_cases(args.set, args.dtypes, args.layouts)
    if args.max_cases:
        cases = cases[: args.max_cases]
    if args.list:
        for c in cases:
            print(f"{c.family:8s} {str(c.shape):20s} {c.layout} {c.dtype} "
                  f"fwd {c.floor_bytes('fwd') / 1e6:8.2f} MB  "
                  f"fwd+bwd {c.floor_bytes('fwdbwd') / 1e6:8.2f} MB")
        return 0
    if not torch.cuda.is_available():
        print("gpu_norm.py needs a CUDA device (none found); nothing was measured.",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("gpu_norm.py needs triton; nothing was measured.", file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    copy_gbps = measure_copy_gbps()
    meta = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), copy_gbps=copy_gbps, l2_bytes=l2,
                sm_count=props.multi_processor_count, set=args.set,
                time=_dt.datetime.now(_dt.timezone.utc).isoformat())
    print(f"device {props.name}: copy bandwidth {copy_gbps:.0f} GB/s, L2 {l2 >> 20} MiB")
    graphs = [False] if args.no_graph else [False, True]
    base = result_base(meta, args.out)
    meta["complete"] = False
    rows = run_benchmarks(cases, args.impls, args.modes, graphs, copy_gbps, l2,
                          on_case=lambda so_far: write_results(so_far, meta, base))
    meta["complete"] = True
    csv_path, json_path = write_results(rows, meta, base)
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
