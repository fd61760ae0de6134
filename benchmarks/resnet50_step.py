"""ResNet-50 training step with BatchNorm, torch GroupNorm and normlab GroupNorm (issue 3).

The Group Normalization paper (Wu & He, ECCV 2018) trains ResNet-50 with GN in place of BN; the
cost question is what GN does to a training step. REFERENCE section 6 measured (H100, timm model,
bf16 autocast, channels_last, SGD): GN / BN = 1.52 at batch 8, 2.38 at 64, 3.14 at 128. Target
for normlab GN: <= 1.10x the BN step at batch 64 and 128.

One step = forward under bf16 autocast, cross-entropy, backward, SGD (momentum 0.9) update, on
channels_last input of 224x224 with random labels. The median of ``--steps`` timed steps (CUDA
events) after ``--warmup`` steps is reported, with images/s. Each step runs eagerly and (``graph``
rows) as the replay of a CUDA graph of the whole step (forward, backward, optimizer), captured
after the warm-up: without the host's launch gaps, what the kernels themselves cost.

Normalization variants:

* ``bn``        torch.nn.BatchNorm2d
* ``torch_gn``  torch.nn.GroupNorm(32, C)   (autocast runs it in float32: torch's policy)
* ``normlab_gn`` normlab.nn.GroupNorm(32, C) (CUDA tensors pick the Triton backend; bf16 in/out)
* ``normlab_gn_act`` the same model through ``normlab.optimize``: each ReLU that is its GN's
  output's only reader is fused into the GN (timm / torchvision: the stem's and each
  bottleneck's first two; the one after the residual add stays a module). Measured after the
  three above, at every batch and mode, as far as ``--time-budget`` allows: what the fusion
  buys in a real step (README: "not measured").

The model comes from torchvision (``resnet50(norm_layer=...)``) if importable, else timm
(``resnet50``, ``norm_layer=``), else normlab.models (imported only when needed, so this script
does not depend on it at import time). ``--builder`` forces one.

A model that fails (out of memory, a kernel error) gets a row with ``status`` "error: ..." and
the run goes on; the CSV/JSON are rewritten after every model; ``--time-budget`` starts no new
model after that many seconds. ``meta.normlab_backend`` names the backend normlab's GroupNorm
resolves to for the step's bf16 channels_last activations (it must be "triton" on the GPU).

Usage (CUDA only; exits with status 2 otherwise)::

    python benchmarks/resnet50_step.py --batches 8 64 128
    python benchmarks/resnet50_step.py --dry-run --out /tmp/x   # CPU rehearsal, 32x32 images

``--dry-run`` runs the same step on the CPU (bf16 CPU autocast, channels_last, wall clock) at
batch 2 on 32x32 images with 1 warm-up and 2 timed steps: it checks the builders, the three
norm layers and the result files, not speed (no CUDA graph exists there: graph rows time the
eager step, bookkeeping only).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

NORMS = ("bn", "torch_gn", "normlab_gn")  # the comparison: measured first
EXTRA_NORMS = ("normlab_gn_act",)  # then these, while the time budget lasts
BUILDERS = ("torchvision", "timm", "normlab")


def norm_layer(kind: str) -> Callable[[int], nn.Module]:
    """C -> normalization module for the variant ``kind``."""
    if kind == "bn":
        return lambda c: nn.BatchNorm2d(c)
    if kind == "torch_gn":
        return lambda c: nn.GroupNorm(32, c)
    if kind in ("normlab_gn", "normlab_gn_act"):
        import normlab.nn as NN

        return lambda c: NN.GroupNorm(32, c)
    raise ValueError(f"unknown norm {kind!r}; expected one of {NORMS + EXTRA_NORMS}")


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
    model = _build(kind, builder, num_classes)
    if kind == "normlab_gn_act":
        import normlab

        model, record = normlab.optimize(model)
        print(f"normlab.optimize: {len(record.fused)} activations fused into GroupNorm "
              f"(traced: {record.traced})", flush=True)
    return model


def _build(kind: str, builder: str, num_classes: int) -> nn.Module:
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
        if kind in ("normlab_gn", "normlab_gn_act"):
            import normlab.nn as NN

            cls = NN.GroupNorm
        else:
            cls = nn.BatchNorm2d if kind == "bn" else nn.GroupNorm
        return imagenet_resnet(50, norm=cls, num_classes=num_classes)
    raise ValueError(f"unknown builder {builder!r}; expected one of {BUILDERS}")


def count_norm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in model.modules())


def time_steps(model: nn.Module, batch: int, steps: int, warmup: int, device: str = "cuda",
               image_size: int = 224, graph: bool = False) -> Tuple[float, float]:
    """(median ms per step, interquartile range ms) of a bf16-autocast channels_last SGD step.
    On CUDA each step is timed with events (host launch gaps included: that is the step's
    cost), or with ``graph`` each replay of the captured step; on the CPU (dry run) with a
    wall clock. Autocast's weight-cast cache is off (a captured graph must not keep casts
    made outside it; one forward per autocast region gains nothing from it anyway)."""
    model = model.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step(zero: bool = True):
        if zero:
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    run = step
    if graph and device == "cuda":
        run = _capture(step, opt, warmup)
    else:
        for _ in range(warmup):
            step()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(steps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    if len(times) < 2:
        return times[0], 0.0
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0]


def _capture(step: Callable[..., None], opt: torch.optim.Optimizer,
             warmup: int) -> Callable[[], None]:
    """Warm up on a side stream (optimizer state, cuDNN and Triton choices are made there),
    then capture one whole step; the gradients are allocated inside the capture (set to None
    just before it), so every replay rewrites them rather than adding to them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        step(zero=False)
    return g.replay


def normlab_backend_name(device: str) -> str:
    """The backend normlab's GroupNorm picks for a bf16 channels_last ResNet activation."""
    try:
        from normlab.backends import resolve_backend

        x = torch.empty(2, 64, 8, 8, device=device, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        backend = resolve_backend(None, x, 32, False, None)
        return str(getattr(backend, "name", type(backend).__name__))
    except Exception as e:  # noqa: BLE001 - informational only
        return f"unknown ({type(e).__name__}: {e})"[:120]


ROW_FIELDS = ("batch", "norm", "builder", "graph", "ms", "iqr_ms", "img_per_s", "norm_layers",
              "vs_bn", "status")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="batch sizes (default 8 64 128; dry run: 2)")
    p.add_argument("--norms", nargs="+", default=list(NORMS + EXTRA_NORMS),
                   choices=NORMS + EXTRA_NORMS)
    p.add_argument("--builder", choices=BUILDERS, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30; dry run 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10; dry 1)")
    p.add_argument("--image-size", type=int, default=None, help="default 224; dry run 32")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new model after S seconds (results so far are kept)")
    p.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=("eager", "graph"),
                   help="eager steps and/or CUDA-graph replays of the whole step")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU rehearsal: bf16 CPU autocast, wall clock, small images")
    p.add_argument("--out", default=None,
                   help="result folder (default benchmarks/results; dry run: a temp folder)")
    args = p.parse_args(argv)
    dry = args.dry_run
    batches = args.batches or ([2] if dry else [8, 64, 128])
    steps = args.steps if args.steps is not None else (2 if dry else 30)
    warmup = args.warmup if args.warmup is not None else (1 if dry else 10)
    image_size = args.image_size or (32 if dry else 224)
    out = args.out or (os.path.join(tempfile.gettempdir(), "normlab-dry-run") if dry else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))

    if not dry and not torch.cuda.is_available():
        print("resnet50_step.py needs a CUDA device (none found); nothing was measured.",
              file=sys.stderr)
        return 2
    builders = available_builders()
    builder = args.builder or (builders[0] if builders else None)
    if builder is None or builder not in builders:
        print(f"no ResNet-50 builder available (tried {BUILDERS}); nothing was measured.",
              file=sys.stderr)
        return 2

    device = "cpu" if dry else "cuda"
    if dry:
        dev_name = "cpu-dry-run"
    else:
        torch.backends.cudnn.benchmark = True
        dev_name = torch.cuda.get_device_properties(0).name
    meta = dict(device=dev_name, torch=torch.__version__, python=platform.python_version(),
                builder=builder, builders_available=builders, steps=steps, warmup=warmup,
                image_size=image_size, autocast="bfloat16", memory_format="channels_last",
                normlab_backend=normlab_backend_name(device)
                if {"normlab_gn", "normlab_gn_act"} & set(args.norms) else None,
                time=_dt.datetime.now(_dt.timezone.utc).isoformat(), complete=False)
    print(f"device {dev_name}, builder {builder}, normlab backend {meta['normlab_backend']}",
          flush=True)
    os.makedirs(out, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in dev_name)
    base = os.path.join(out, f"resnet50_step_{safe}_{stamp}")
    rows: List[Dict] = []
    t_start = time.monotonic()
    stopped = False
    base_ms: Dict[Tuple[int, bool], float] = {}  # (batch, graph) -> BN's ms
    for batch, graph, kind in measure_order(batches, args.modes, args.norms):
        if args.time_budget is not None and time.monotonic() - t_start > args.time_budget:
            print(f"time budget of {args.time_budget:.0f} s spent: stopping before "
                  f"batch {batch} {kind} graph={graph}", flush=True)
            stopped = True
            break
        row = _measure(batch, kind, graph, builder, steps, warmup, device, image_size,
                       base_ms.get((batch, graph)))
        if kind == "bn" and row["status"] == "ok":
            base_ms[(batch, graph)] = row["ms"]
        rows.append(row)
        _write(base, meta, rows)  # after every model: a time limit keeps the rows

    meta["complete"] = not stopped
    _write(base, meta, rows)
    print(f"wrote {base}.csv and {base}.json")
    failed = [r for r in rows if r["status"] != "ok"]
    return 1 if dry and failed else 0


def measure_order(batches: Sequence[int], modes: Sequence[str],
                  norms: Sequence[str]) -> List[Tuple[int, bool, str]]:
    """(batch, graph, norm) in the order measured: every point of the issue's three norms
    first (BN first at each, the baseline of its ratio), then the extra variants, so that a
    spent time budget cuts the extras, not the comparison."""
    tiers = ([k for k in NORMS if k in norms], [k for k in EXTRA_NORMS if k in norms])
    return [(batch, mode == "graph", kind) for tier in tiers for batch in batches
            for mode in modes for kind in tier]


def _measure(batch: int, kind: str, graph: bool, builder: str, steps: int, warmup: int,
             device: str, image_size: int, base_ms: Optional[float]) -> Dict:
    """One model's row (an exception is recorded in ``status``; the run goes on)."""
    model = None
    layers = None
    try:
        torch.manual_seed(0)
        model = build_resnet50(kind, builder)
        layers = count_norm_layers(model)
        ms, iqr = time_steps(model, batch, steps, warmup, device, image_size, graph)
        status = "ok"
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record, go on
        ms, iqr, status = float("nan"), float("nan"), f"error: {type(e).__name__}: {e}"[:240]
    if kind == "bn":
        base_ms = ms  # the baseline of its own row: 1.0x
    row = dict(batch=batch, norm=kind, builder=builder, graph=graph, ms=ms, iqr_ms=iqr,
               img_per_s=batch / (ms * 1e-3), norm_layers=layers,
               vs_bn=(ms / base_ms) if base_ms and status == "ok" else None, status=status)
    assert tuple(row) == ROW_FIELDS, tuple(row)
    print(f"batch {batch:4d} {kind:14s} graph={int(graph)} {ms:8.2f} ms (IQR {iqr:.2f}) "
          f"{row['img_per_s']:8.0f} img/s"
          + (f"  {row['vs_bn']:.2f}x BN" if row["vs_bn"] else "")
          + ("" if status == "ok" else f"  {status}"), flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _json_safe(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _write(base: str, meta: dict, rows: List[Dict]) -> None:
    """(Re)write base.csv and base.json through a temporary name (a kill mid-write leaves the
    previous file); NaN is an empty CSV cell and null in the JSON."""
    with open(base + ".csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        writer.writerows([{k: ("" if _json_safe(v) is None else v) for k, v in r.items()}
                          for r in rows])
    os.replace(base + ".csv.tmp", base + ".csv")
    with open(base + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "rows": [{k: _json_safe(v) for k, v in r.items()}
                                          for r in rows]}, f, indent=1)
    os.replace(base + ".json.tmp", base + ".json")


if __name__ == "__main__":
    sys.exit(main())
