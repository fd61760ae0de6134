"""normlab.nn vs torch.nn on CPU: forward + backward time of GN/BN/LN/IN at a few shapes.

On CPU only ratios measured in one run mean anything (absolute times depend on the machine and
its load), so each pair is timed in interleaved rounds - ours, torch, ours, torch, ... - and the
ratio of the medians is reported. Target (issue: core): normlab within 10% of torch.nn. Cases
labelled NHWC take channels_last input (see also benchmarks/cpu_channels_last.py).

    python benchmarks/cpu_layers.py [--repeats 30] [--cases RMS] [--out benchmarks/results/cpu_layers.csv]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import normlab
import normlab.nn as nlnn

# (label, normlab module, torch module, input shape): sizes of small-batch CNN layers
CASES = [
    ("GN32 (8,256,28,28)", lambda: nlnn.GroupNorm(32, 256), lambda: nn.GroupNorm(32, 256), (8, 256, 28, 28)),
    ("GN32 (32,64,32,32)", lambda: nlnn.GroupNorm(32, 64), lambda: nn.GroupNorm(32, 64), (32, 64, 32, 32)),
    ("GN8 (64,16,8,8)", lambda: nlnn.GroupNorm(8, 16), lambda: nn.GroupNorm(8, 16), (64, 16, 8, 8)),
    ("BN (8,256,28,28)", lambda: nlnn.BatchNorm2d(256), lambda: nn.BatchNorm2d(256), (8, 256, 28, 28)),
    ("BN (32,64,32,32)", lambda: nlnn.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (32, 64, 32, 32)),
    ("BN (64,16,8,8)", lambda: nlnn.BatchNorm2d(16), lambda: nn.BatchNorm2d(16), (64, 16, 8, 8)),
    ("LN (32,196,768)", lambda: nlnn.LayerNorm(768), lambda: nn.LayerNorm(768), (32, 196, 768)),
    ("LN (64,64)", lambda: nlnn.LayerNorm(64), lambda: nn.LayerNorm(64), (64, 64)),
    ("IN (8,64,56,56)", lambda: nlnn.InstanceNorm2d(64, affine=True), lambda: nn.InstanceNorm2d(64, affine=True), (8, 64, 56, 56)),
    ("IN (16,32,16,16)", lambda: nlnn.InstanceNorm2d(32, affine=True), lambda: nn.InstanceNorm2d(32, affine=True), (16, 32, 16, 16)),
    # channels_last input (labels end in "NHWC"): native's own path against ATen's channels_last
    # kernel, which torch.nn calls (inaccurate at an offset, and its backward is slow)
    ("GN32 (8,64,32,32) NHWC", lambda: nlnn.GroupNorm(32, 64), lambda: nn.GroupNorm(32, 64), (8, 64, 32, 32)),
    ("GN32 (16,256,8,8) NHWC", lambda: nlnn.GroupNorm(32, 256), lambda: nn.GroupNorm(32, 256), (16, 256, 8, 8)),
    ("IN (8,64,32,32) NHWC", lambda: nlnn.InstanceNorm2d(64, affine=True), lambda: nn.InstanceNorm2d(64, affine=True), (8, 64, 32, 32)),
    # RMSNorm over the features (the transformer case): tokens of ViT-B, an LLM width, a tiny one
    ("RMS (32,196,768)", lambda: nlnn.RMSNorm(768), lambda: nn.RMSNorm(768), (32, 196, 768)),
    ("RMS (8,512,2048)", lambda: nlnn.RMSNorm(2048), lambda: nn.RMSNorm(2048), (8, 512, 2048)),
    ("RMS (64,64)", lambda: nlnn.RMSNorm(64), lambda: nn.RMSNorm(64), (64, 64)),
]


def _fwd_bwd(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(g)


def _time_once(module, x, g, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        _fwd_bwd(module, x, g)
    return (time.perf_counter() - t0) / inner


def measure(repeats: int, only: str = "") -> list[dict]:
    rows = []
    for label, make_ours, make_torch, shape in CASES:
        if only and not label.startswith(only):
            continue
        torch.manual_seed(0)
        fmt = torch.channels_last if label.endswith("NHWC") else torch.contiguous_format
        x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(shape).contiguous(memory_format=fmt)
        ours, theirs = make_ours(), make_torch()
        ours.load_state_dict(theirs.state_dict())
        # warm-up, and choose an inner loop of about 20 ms
        for m in (ours, theirs):
            for _ in range(3):
                _fwd_bwd(m, x, g)
        one = _time_once(theirs, x, g, 1)
        inner = max(1, int(0.02 / max(one, 1e-6)))
        t_ours, t_torch = [], []
        for _ in range(repeats):
            t_ours.append(_time_once(ours, x, g, inner))
            t_torch.append(_time_once(theirs, x, g, inner))
        mo, mt = statistics.median(t_ours), statistics.median(t_torch)
        rows.append({
            "case": label, "normlab_us": round(mo * 1e6, 1), "torch_us": round(mt * 1e6, 1),
            "ratio": round(mo / mt, 3),
        })
        print(f"{label:22s} normlab {mo*1e6:9.1f} us  torch {mt*1e6:9.1f} us  ratio {mo/mt:5.2f}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cases", default="", help="only the cases whose label starts with this")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_layers.csv"))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, normlab {normlab.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; backend auto -> native on CPU", flush=True)
    rows = measure(args.repeats, args.cases)
    geo = 1.0
    for r in rows:
        geo *= r["ratio"]
    geo **= 1 / len(rows)
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"geometric mean ratio {geo:.3f}; worst {worst['case']} {worst['ratio']:.3f} (target <= 1.10)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "threads", "torch", "case", "normlab_us", "torch_us", "ratio"])
        w.writeheader()
        for r in rows:
            w.writerow({"device": f"cpu:{platform.machine()}", "threads": torch.get_num_threads(),
                        "torch": torch.__version__, **r})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
