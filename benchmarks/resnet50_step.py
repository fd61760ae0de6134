"""ResNet-50 training step with BatchNorm, torch GroupNorm and normlab GroupNorm (issue 3).

The Group Normalization paper (Wu & He, ECCV 2018) trains ResNet-50 with GN in place of BN; the
cost question is what GN does to a training step. REFERENCE section 6 measured (H100, timm model,
bf16 autocast, channels_last, SGD): GN / BN = 1.52 at batch 8, 2.38 at 64, 3.14 at 128. Target
for normlab GN: <= 1.10x the BN step at batch 64 and 128.

One step = forward under bf16 autocast, cross-entropy, backward, SGD (momentum 0.9) update, on
channels_last input of 224x224 with random labels. The median of ``--steps`` timed steps (CUDA
events) after ``--warmup`` steps is reported, with images/s.

Normalization variants:

* ``bn``        torch.nn.BatchNorm2d
* ``torch_gn``  torch.nn.GroupNorm(32, C)   (autocast runs it in float32: torch's policy)
* ``normlab_gn`` normlab.nn.GroupNorm(32, C) (CUDA tensors pick the Triton backend; bf16 in/out)

The model comes from torchvision (``resnet50(norm_layer=...)``) if importable, else timm
(``resnet50``, ``norm_layer=``), else normlab.models (imported only when needed, so this script
does not depend on it at import time). ``--builder`` forces one.

Usage (CUDA only; exits with status 2 otherwise)::

    python benchmarks/resnet50_step.py --batches 8 64 128
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

NORMS = ("bn", "torch_gn", "normlab_gn")
BUILDERS = ("torchvision", "timm", "normlab")


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """C -> normalization module for the variant ``kind``."""
    if kind == "bn":
        return lambda c: nn.BatchNorm2d(c)
    if kind == "torch_gn":
        return lambda c: nn.GroupNorm(32, c)
    if kind == "normlab_gn":
        import normlab.nn as NN

        return lambda c: NN.GroupNorm(32, c)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS}")


def available_builders() -> List[str]:
    found = []
    for name, module in (("torchvision", "torchvision"), ("timm", "timm"),
                         ("normlab", "normlab.models")):
        try:
            __import__(module)
            found.append(name)
        except Exception:  # noqa: BLE001 - missing or broken optional dependency
            pass
    return found


def build_resnet50(kind: str, builder: str, num_classes: int = 1000) -> nn.Module:
    layer = norm_layer(kind)
    if builder == "torchvision":
        import torchvision

        return torchvision.models.resnet50(norm_layer=layer, num_classes=num_classes)
    if builder == "timm":
        import timm

        # timm calls norm_layer(C) for its BN slots
        return timm.create_model("resnet50", norm_layer=layer, num_classes=num_classes)
    if builder == "normlab":
        from normlab.models.resnet import imagenet_resnet

        # normlab's factory takes module classes (GroupNorm classes get 32 groups by its rule)
        if kind == "normlab_gn":
            import normlab.nn as NN

            cls = NN.GroupNorm
        else:
            cls = nn.BatchNorm2d if kind == "bn" else nn.GroupNorm
        return imagenet_resnet(50, norm=cls, num_classes=num_classes)
    raise ValueError(f"unknown builder {builder!r}; expected one of {BUILDERS}")


def count_norm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())


def time_steps(model: nn.Module, batch: int, steps: int, warmup: int) -> Tuple[float, float]:
    """(median ms per step, interquartile range ms) of a bf16-autocast channels_last SGD step."""
    model = model.cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64, 128])
    p.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS)
    p.add_argument("--builder", choices=BUILDERS, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("resnet50_step.py needs a CUDA device (none found); nothing was measured.",
              file=sys.stderr)
        return 2
    builders = available_builders()
    builder = args.builder or (builders[0] if builders else None)
    if builder is None or builder not in builders:
        print(f"no ResNet-50 builder available (tried {BUILDERS}); nothing was measured.",
              file=sys.stderr)
        return 2

    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    meta = dict(device=props.name, torch=torch.__version__, python=platform.python_version(),
                builder=builder, steps=args.steps, warmup=args.warmup,
                time=_dt.datetime.now(_dt.timezone.utc).isoformat(), complete=False)
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(args.out, f"resnet50_step_{props.name.replace(' ', '_')}_{stamp}")
    rows: List[Dict] = []
    for batch in args.batches:
        base_ms = None
        for kind in args.norms:
            torch.manual_seed(0)
            model = build_resnet50(kind, builder)
            ms, iqr = time_steps(model, batch, args.steps, args.warmup)
            if kind == "bn":
                base_ms = ms
            row = dict(batch=batch, norm=kind, builder=builder, ms=ms, iqr_ms=iqr,
                       img_per_s=batch / (ms * 1e-3), norm_layers=count_norm_layers(model),
                       vs_bn=(ms / base_ms) if base_ms else None)
            rows.append(row)
            print(f"batch {batch:4d} {kind:11s} {ms:8.2f} ms (IQR {iqr:.2f}) "
                  f"{row['img_per_s']:8.0f} img/s"
                  + (f"  {row['vs_bn']:.2f}x BN" if row["vs_bn"] else ""), flush=True)
            del model
            torch.cuda.empty_cache()
            _write(base, meta, rows)  # after every model: a time limit keeps what was measured

    meta["complete"] = True
    _write(base, meta, rows)
    print(f"wrote {base}.csv and {base}.json")
    return 0


def _write(base: str, meta: dict, rows: List[Dict]) -> None:
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
