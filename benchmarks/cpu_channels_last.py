"""Channels_last CPU group norm (GN, IN): normlab's native path against torch and the accurate
alternatives, time and accuracy at offset 1000 (benchmarks/NOTES.md, "CPU: channels_last").

Routes, each on x = 1000 + randn (float32 or bfloat16) with a random affine:

* torch_cl:     F.group_norm on channels_last input (ATen's channels_last kernel; inaccurate here)
* torch_nchw:   F.group_norm on the same values in NCHW (input and output NCHW: the floor)
* native:       normlab.functional.group_norm (backend native) on channels_last input (the
                sums path or the shifted ATen kernel, by native_channels_last.uses_sums_path)
* shifted_aten: ATen's channels_last kernel on x minus one element per group (native before
                the sums path; what native runs where the size rule says so)
* sums_path:    native's sums path, whatever the size rule says (forward-only calls too)
* nchw_copy:    x.contiguous() -> ATen NCHW kernel -> output back to channels_last
* native_REV:   with --before REV, native with native_channels_last.py as of git revision REV

Times are the minimum over interleaved rounds (all routes of a case take turns, so load drift
on a shared machine hits each alike); each is reported as a ratio to torch_cl of the same run.

    python benchmarks/cpu_channels_last.py [--threads 1 2] [--repeats 7] [--clock wall|cpu]
        [--before REV] [--accuracy] [--out benchmarks/results/cpu_channels_last.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import platform
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

import normlab
import normlab.functional as NF
import normlab.backends.native as native_backend
from normlab.backends.native_channels_last import shifted_aten_group_norm, sums_group_norm

CL = torch.channels_last
# (N, C, H, W), G = 32 and G = C each
SHAPES = [
    (8, 64, 32, 32),  # a mid ResNet stage: 1024 positions, ATen's vectorized forward
    (32, 32, 16, 16),  # a small-map batch, one channel per group even at G = 32
    (16, 256, 8, 8),  # a wide small map: G = 32 has 8 channels per group, where ATen is fast
    (2, 128, 64, 64),  # a large map at batch 2
    (8, 64, 8, 8),  # a small layer (32k elements): near the size rule's edge for narrow groups
    (2, 32, 4, 4),  # a tiny layer (1k elements): the per-call cost alone
]


def _nchw_copy(x, g, w, b):
    n, c = x.shape[:2]
    y = torch.native_group_norm(x.contiguous(), w, b, n, c, x[0, 0].numel(), g, 1e-5)[0]
    return y.contiguous(memory_format=CL)


ROUTES = {
    "torch_cl": lambda x, g, w, b: F.group_norm(x, g, w, b),
    "torch_nchw": lambda x, g, w, b: F.group_norm(x, g, w, b),  # fed NCHW input
    "native": lambda x, g, w, b: NF.group_norm(x, g, w, b, backend="native"),
    "shifted_aten": lambda x, g, w, b: shifted_aten_group_norm(x, w, b, g, 1e-5)[0],
    "sums_path": lambda x, g, w, b: sums_group_norm(x, w, b, g, 1e-5, w.dtype)[0],
    "nchw_copy": _nchw_copy,
}


def native_at(rev: str):
    """A route: native through normlab's dispatch as now, with native_channels_last.py as of git
    revision rev (loaded from `git show`; the dispatch calls group_norm_channels_last by name)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = subprocess.run(["git", "show", f"{rev}:src/normlab/backends/native_channels_last.py"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"native_channels_last@{rev}")
    exec(compile(src, f"{rev}:native_channels_last.py", "exec"), module.__dict__)

    def route(x, g, w, b):
        current = native_backend.group_norm_channels_last
        native_backend.group_norm_channels_last = module.group_norm_channels_last
        try:
            return NF.group_norm(x, g, w, b, backend="native")
        finally:
            native_backend.group_norm_channels_last = current
    return route


def _inputs(route, x0, dy0):
    fmt = torch.contiguous_format if route == "torch_nchw" else CL
    # detached first: x0 itself, already in the layout, must not become a leaf that requires grad
    return x0.detach().contiguous(memory_format=fmt).requires_grad_(), dy0.contiguous(memory_format=fmt)


# wall: elapsed time (what a caller waits); cpu: this process's CPU time (all its threads), which
# time slices lost to other processes on a shared machine do not inflate - for one thread the
# same quantity as wall on an idle machine
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _time(f, x, g, w, b, dy, backward: bool, inner: int) -> float:
    t0 = _clock()
    for _ in range(inner):
        if backward:
            x.grad = w.grad = b.grad = None
            f(x, g, w, b).backward(dy)
        else:
            with torch.no_grad():
                f(x, g, w, b)
    return (_clock() - t0) / inner


def measure(threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for shape, g_name, dtype in itertools.product(SHAPES, ("32", "C"), (torch.float32, torch.bfloat16)):
        g = 32 if g_name == "32" else shape[1]
        torch.manual_seed(0)
        x0 = (1000 + torch.randn(shape)).to(dtype)
        dy0 = torch.randn(shape).to(dtype)
        w = torch.randn(shape[1], dtype=dtype).requires_grad_()
        b = torch.randn(shape[1], dtype=dtype).requires_grad_()
        for backward in (False, True):
            setup, best = {}, {}
            for name, f in ROUTES.items():
                x, dy = _inputs(name, x0, dy0)
                _time(f, x, g, w, b, dy, backward, 2)  # warm-up
                one = _time(f, x, g, w, b, dy, backward, 1)
                setup[name] = (f, x, dy, max(1, int(0.005 / max(one, 1e-6))))
                best[name] = float("inf")
            for _ in range(repeats):
                for name, (f, x, dy, inner) in setup.items():
                    best[name] = min(best[name], _time(f, x, g, w, b, dy, backward, inner))
            base = best["torch_cl"]
            row = {"threads": threads, "shape": "x".join(map(str, shape)), "groups": g_name,
                   "dtype": str(dtype).replace("torch.", ""),
                   "pass": "fwd+bwd" if backward else "fwd", "torch_cl_us": round(base * 1e6, 1)}
            row.update({f"{k}_ratio": round(v / base, 3) for k, v in best.items() if k != "torch_cl"})
            rows.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    return rows


def accuracy() -> None:
    """Relative max error of y, dx, dw, db against float64 (torch's NCHW kernel in float64)."""
    for shape, g_name, dtype in itertools.product(SHAPES, ("32", "C"), (torch.float32, torch.bfloat16)):
        g = 32 if g_name == "32" else shape[1]
        torch.manual_seed(0)
        x = (1000 + torch.randn(shape, dtype=torch.float64)).to(dtype)
        w, b = (1 + 0.5 * torch.randn(shape[1])).to(dtype), torch.randn(shape[1]).to(dtype)
        dy = torch.randn(shape).to(dtype)
        ref = [t.double().requires_grad_() for t in (x, w, b)]
        y_ref = F.group_norm(ref[0], g, ref[1], ref[2])
        y_ref.backward(dy.double())
        want = [y_ref.detach()] + [t.grad for t in ref]
        for name, f in ROUTES.items():
            xi, dyi = _inputs(name, x, dy)
            wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
            y = f(xi, g, wi, bi)
            y.backward(dyi)
            errs = [(a.double() - r).abs().max().item() / r.abs().max().item()
                    for a, r in zip((y, xi.grad, wi.grad, bi.grad), want)]
            print(f"{str(shape):17s} G={g_name:2s} {str(dtype)[6:]:8s} {name:12s} "
                  + " ".join(f"{k} {e:.1e}" for k, e in zip(("y", "dx", "dw", "db"), errs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="what is timed (cpu: for one thread on a loaded machine)")
    ap.add_argument("--accuracy", action="store_true", help="print errors at offset 1000 instead")
    ap.add_argument("--before", metavar="REV",
                    help="also time native with native_channels_last.py as of this git revision")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_channels_last.csv"))
    args = ap.parse_args()
    if args.before:
        ROUTES[f"native_{args.before}"] = native_at(args.before)
    if args.accuracy:
        return accuracy()
    print(f"torch {torch.__version__}, normlab {normlab.__version__}, "
          f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f}", flush=True)
    global _clock
    _clock = CLOCKS[args.clock]
    rows = [r for t in args.threads for r in measure(t, args.repeats)]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "torch", "load", "clock"] + list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({"device": f"cpu:{platform.machine()}", "torch": torch.__version__,
                        "load": f"{os.getloadavg()[0]:.1f}", "clock": args.clock, **r})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
