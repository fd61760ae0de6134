"""normlab.nn vs torch.nn on CPU: forward + backward time of GN/BN/LN/IN/RMS at a few shapes.

On CPU only ratios measured in one run mean anything (absolute times depend on the machine and
its load), so each pair is timed in interleaved rounds - ours, torch, ours, torch, ... - and the
ratio of the medians is reported. Target (issue: core): normlab within 10% of torch.nn. Cases
labelled NHWC take channels_last input (see also benchmarks/cpu_channels_last.py).

Cases labelled "tiny" take a few microseconds of kernel time: what they measure is the per-call
cost of the Python above the kernels (argument checks, backend resolution, views), the cost a
launch-bound model pays once per norm. ``--mode eval`` times the forward alone, modules in eval
mode under ``torch.no_grad()`` (inference); ``train`` (default) forward + backward.

    python benchmarks/cpu_layers.py [--repeats 30] [--cases RMS] [--mode train|eval]
        [--out benchmarks/results/cpu_layers.csv]
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
    # per-call cost (see the docstring): a few us of kernel, so the rest is Python
    ("GN32 (2,64,4,4) tiny", lambda: nlnn.GroupNorm(32, 64), lambda: nn.GroupNorm(32, 64), (2, 64, 4, 4)),
    ("BN (2,64,4,4) tiny", lambda: nlnn.BatchNorm2d(64), lambda: nn.BatchNorm2d(64), (2, 64, 4, 4)),
    ("LN (2,16,64) tiny", lambda: nlnn.LayerNorm(64), lambda: nn.LayerNorm(64), (2, 16, 64)),
    ("RMS (2,16,64) tiny", lambda: nlnn.RMSNorm(64), lambda: nn.RMSNorm(64), (2, 16, 64)),
]


def _fwd_bwd(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    x.grad = None
    module.zero_grad(set_to_none=True)
    module(x).backward(g)


def _forward(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> None:
    module(x)  # (eval mode, under no_grad: see measure)


def _time_once(step, module, x, g, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        step(module, x, g)
    return (time.perf_counter() - t0) / inner


def measure(repeats: int, only: str = "", mode: str = "train") -> list[dict]:
    """``mode="eval"``: the forward of modules in eval mode under ``torch.no_grad()``."""
    if mode == "eval":
        with torch.no_grad():
            return _measure(repeats, only, mode, _forward)
    return _measure(repeats, only, mode, _fwd_bwd)


def _measure(repeats: int, only: str, mode: str, step) -> list[dict]:
    rows = []
    for label, make_ours, make_torch, shape in CASES:
        if only and not label.startswith(only):
            continue
        torch.manual_seed(0)
        fmt = torch.channels_last if label.endswith("NHWC") else torch.contiguous_format
        x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt)
        x.requires_grad_(mode == "train")
        g = torch.randn(shape).contiguous(memory_format=fmt)
        ours, theirs = make_ours(), make_torch()
        ours.load_state_dict(theirs.state_dict())
        for m in (ours, theirs):
            m.train(mode == "train")
        # warm-up, and choose an inner loop of about 20 ms
        for m in (ours, theirs):
            for _ in range(3):
                step(m, x, g)
        one = _time_once(step, theirs, x, g, 10) if mode == "eval" else _time_once(step, theirs, x, g, 1)
        inner = max(1, int(0.02 / max(one, 1e-6)))
        t_ours, t_torch = [], []
        for _ in range(repeats):
            t_ours.append(_time_once(step, ours, x, g, inner))
            t_torch.append(_time_once(step, theirs, x, g, inner))
        mo, mt = statistics.median(t_ours), statistics.median(t_torch)
        rows.append({
            "case": label, "mode": mode, "normlab_us": round(mo * 1e6, 1),
            "torch_us": round(mt * 1e6, 1), "ratio": round(mo / mt, 3),
        })
        print(f"{label:22s} normlab {mo*1e6:9.1f} us  torch {mt*1e6:9.1f} us  ratio {mo/mt:5.2f}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--cases", default="", help="only the cases whose label starts with this")
    ap.add_argument("--mode", choices=("train", "eval"), default="train",
                    help="train: forward + backward; eval: forward in eval mode under no_grad")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_layers.csv"))
    args = ap.parse_args()
    print(f"torch {torch.__version__}, normlab {normlab.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; backend auto -> native on CPU", flush=True)
    rows = measure(args.repeats, args.cases, args.mode)
    geo = 1.0
    for r in rows:
        geo *= r["ratio"]
    geo **= 1 / len(rows)
    worst = max(rows, key=lambda r: r["ratio"])
    print(f"geometric mean ratio {geo:.3f}; worst {worst['case']} {worst['ratio']:.3f} (target <= 1.10)")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "threads", "torch", "case", "mode", "normlab_us",
                                          "torch_us", "ratio"])
        w.writeheader()
        for r in rows:
            w.writerow({"device": f"cpu:{platform.machine()}", "threads": torch.get_num_threads(),
                        "torch": torch.__version__, **r})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
