"""Is the lab's data loader ever the bottleneck? Images/s of the tensor loader vs a training step.

The lab (issue 5) keeps each dataset in memory as tensors and augments CIFAR-style data on the fly
with :func:`normlab.lab.data.pad_crop_flip` (zero-pad 4, random 32x32 crop, random horizontal
flip, one gather per batch) inside :class:`normlab.lab.data.TensorLoader`. This script measures,
on a synthetic CIFAR-sized training set (50,000 x 3 x 32 x 32):

* the loader: one full shuffled, augmented epoch (permutation, indexing, pad-crop-flip), median of
  ``--repeats`` epochs, in images/s; float32 (what the lab stores: standardized floats) and uint8
  (the raw CIFAR bytes, for comparison);
* a ResNet-20 (BN, the lab's default model) SGD training step at the same batch size on the same
  CPU threads: forward, cross-entropy, backward, step; median over ``--steps`` steps after
  warm-up, in images/s;

and prints their ratio. The loader runs in the training process, between steps, so the share of
an epoch spent loading is ``train_img_s / (loader_img_s + train_img_s)``; a ratio of 10 means
about 9% of the time.

    python benchmarks/loader.py [--batches 2 32] [--threads 2] [--repeats 3] [--steps 40]
                                [--out benchmarks/results/loader_cpu.csv]
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
from torch.nn import functional as F

from normlab.lab.data import TensorLoader
from normlab.models import create

N, C, H = 50_000, 3, 32


def synthetic_cifar(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """50k random CIFAR-shaped images: uint8 bytes, or float32 standardized per channel (as the
    lab's CIFAR loader stores them), and labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (N, C, H, H), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    if dtype == torch.float32:
        xf = x.float().div_(255)
        mean = xf.mean(dim=(0, 2, 3), keepdim=True)
        std = xf.std(dim=(0, 2, 3), keepdim=True)
        x = (xf - mean) / std
    return x, y


def loader_images_per_s(x: torch.Tensor, y: torch.Tensor, batch: int, repeats: int) -> float:
    """Median images/s of full augmented epochs of the lab's TensorLoader."""
    loader = TensorLoader(x, y, batch, shuffle=True, drop_last=True, augment=True, seed=0)
    rates = []
    for epoch in range(repeats):
        loader.set_epoch(epoch)
        n = 0
        t0 = time.perf_counter()
        for xb, _ in loader:
            n += len(xb)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def train_images_per_s(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int) -> float:
    """Median images/s of ResNet-20 (BN) SGD steps at ``batch`` on batches from ``x``."""
    torch.manual_seed(0)
    model = create("resnet20", norm="bn", num_classes=10, in_chans=C)
    opt = torch.optim.SGD(model.parameters(), lr=0.1 * batch / 32, momentum=0.9,
                          weight_decay=1e-4)
    model.train()
    times = []
    for i in range(steps + 5):  # 5 warm-up steps
        j = (i * batch) % (N - batch)
        xb, yb = x[j:j + batch], y[j:j + batch]
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 32])
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch CPU threads (the lab trains with the machine's threads)")
    ap.add_argument("--repeats", type=int, default=3, help="loader epochs per measurement")
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per batch size")
    ap.add_argument("--out", default="benchmarks/results/loader_cpu.csv")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.batches) or args.threads < 1 or args.repeats < 1 or args.steps < 1:
        ap.error("--batches, --threads, --repeats and --steps must be >= 1")
    torch.set_num_threads(args.threads)
    data = {name: synthetic_cifar(dt) for name, dt in (("float32", torch.float32),
                                                       ("uint8", torch.uint8))}
    rows = []
    for batch in args.batches:
        train = train_images_per_s(*data["float32"], batch, args.steps)
        for name, (x, y) in data.items():
            load = loader_images_per_s(x, y, batch, args.repeats)
            row = {"device": "cpu", "cpu_count": os.cpu_count(), "threads": args.threads,
                   "dtype": name, "batch": batch, "loader_img_s": round(load, 1),
                   "train_step_ms": round(1e3 * batch / train, 3),
                   "train_img_s": round(train, 1), "loader_over_train": round(load / train, 2),
                   "loading_share_pct": round(100 * train / (load + train), 2),
                   "torch": torch.__version__, "python": platform.python_version()}
            rows.append(row)
            print(f"batch {batch:3d} {name:7s}: loader {load:10.0f} img/s | ResNet-20 step "
                  f"{row['train_step_ms']:7.2f} ms = {train:7.0f} img/s | loader/train "
                  f"{load / train:7.1f}x | loading {row['loading_share_pct']:.1f}% of an epoch",
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
