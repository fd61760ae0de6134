"""Whole timm models on CPU: does normlab.optimize, or a normlab GroupNorm, slow a training step?

For each model (timm, built untrained) two pairs are timed, each pair on identical weights:

* ``optimize``: the model as timm builds it (base) against ``normlab.optimize`` of a deep copy
  (cand); the CSV's ``record`` column says what optimize replaced, fused and left.
* ``gn`` (models with BatchNorm): every BatchNorm replaced by GroupNorm with 32 groups
  (``normlab.convert_norm(..., "gn", num_groups=32)``: at most 32, a divisor of C, so 24
  channels get 24 groups). cand is that normlab model; base is a copy in which each normlab
  GroupNorm is swapped for ``torch.nn.GroupNorm`` with the same groups, eps and parameters,
  followed by the activation the normlab norm had fused (timm's norm-act layers carry one).

Two measurements per pair: a training step (zero_grad, forward, cross-entropy on fixed random
labels, backward; no optimizer step, so the weights stay identical) and an eval forward under
no_grad. CNNs are timed in NCHW and channels_last (model and input), at 1 and 2 threads.

On CPU only ratios measured in one run mean anything (the machine is shared), so the two
models of a pair are timed in interleaved rounds - base, cand, cand, base, ... - and the ratio of
the medians (cand / base) is reported. ``max_diff`` is the largest difference between the two
models' eval outputs relative to the largest output (a check that the pair computes the same).

    python benchmarks/cpu_models.py [--models resnet18 ...] [--threads 1 2] [--rounds 11]
        [--variants optimize gn] [--layouts nchw cl] [--out benchmarks/results/cpu_models.csv]
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.nn as nlnn

# name: (create_model kwargs, batch, image side, has BatchNorm, is a CNN); sizes chosen so that a
# training step takes about 50-300 ms on the 2-core development CPU at 2 threads
MODELS = {
    "resnet18": ({}, 8, 96, True, True),
    "resnet50": ({}, 2, 128, True, True),
    "efficientnet_b0": ({}, 8, 96, True, True),
    "regnetx_002": ({}, 16, 96, True, True),
    "convnext_atto": ({}, 8, 96, False, True),
    "vit_tiny_patch16_224": ({"img_size": 64}, 16, 64, False, False),
}
# one tiny case for the tests: every code path, no meaningful time
TINY = {"resnet18": ({}, 2, 32, True, True)}

FIELDS = ["model", "variant", "base", "cand", "mode", "layout", "threads", "batch", "img",
          "base_ms", "cand_ms", "ratio", "max_diff", "record", "cpu", "torch"]

_ACTS: dict[Optional[str], Callable] = {None: lambda x: x, "relu": F.relu, "silu": F.silu,
                                         "gelu": F.gelu}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def import_timm():
    """timm through tests/timm_import.py (torchvision's compiled ops do not load on this CPU
    torch; that module works around it)."""
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from timm_import import import_timm as _import
    return _import()


class TorchGroupNormAct(nn.GroupNorm):
    """torch.nn.GroupNorm then an activation (the torch twin of a normlab GN with a fused one)."""

    def __init__(self, num_groups, num_channels, eps, affine, activation):
        super().__init__(num_groups, num_channels, eps, affine)
        self.activation = activation

    def forward(self, x):
        return _ACTS[self.activation](super().forward(x))


def torch_gn_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with each normlab GroupNorm replaced by torch's (same groups,
    eps, parameter values; its fused activation applied after it). Forward hooks (convert_norm
    puts one on a norm whose activation it could not fuse) go along."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if type(m) is not nlnn.GroupNorm:
            continue
        new = TorchGroupNormAct(m.num_groups, m.num_channels, m.eps, m.affine, m.activation)
        new.load_state_dict(m.state_dict())
        for k, v in m._modules.items():
            new.add_module(k, v)
        new._forward_hooks.update(m._forward_hooks)
        new.train(m.training)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def _train_step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _eval_fwd(model, x):
    with torch.no_grad():
        model(x)


def time_pair(base, cand, x, y, rounds: int) -> dict:
    """Median times (s) of base and cand, train step and eval forward, in interleaved rounds."""
    def one(m, mode):
        if mode == "train":
            m.train()
            t0 = time.perf_counter()
            _train_step(m, x, y)
        else:
            m.eval()
            t0 = time.perf_counter()
            _eval_fwd(m, x)
        return time.perf_counter() - t0

    for m in (base, cand):  # warm-up (allocator, first-call costs)
        for mode in ("train", "train", "eval", "eval"):
            one(m, mode)
    times = {(k, mode): [] for k in ("base", "cand") for mode in ("train", "eval")}
    for r in range(rounds):
        order = (("base", base), ("cand", cand)) if r % 2 == 0 else (("cand", cand), ("base", base))
        for mode in ("train", "eval"):
            for k, m in order:
                times[(k, mode)].append(one(m, mode))
    return {key: statistics.median(v) for key, v in times.items()}


def _max_diff(base, cand, x) -> float:
    base.eval(), cand.eval()
    with torch.no_grad():
        a, b = base(x), cand(x)
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


def _summary(record) -> str:
    acts = sorted({act for _, act, _ in record.fused})
    return (f"{len(record.replaced)} replaced, {len(record.fused)} fused ({'/'.join(acts) or '-'}), "
            f"{len(record.skipped)} left" + ("" if record.traced is not False else ", not traced"))


def build_pairs(timm, name: str, kwargs: dict, has_bn: bool, variants) -> list:
    """[(variant, base label, cand label, base model, cand model, record text)]."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    pairs = []
    if "optimize" in variants:
        opt, record = normlab.optimize(copy.deepcopy(model))
        pairs.append(("optimize", "timm", "normlab.optimize", model, opt, _summary(record)))
    if "gn" in variants and has_bn:
        nl = normlab.convert_norm(copy.deepcopy(model), "gn", num_groups=32)
        tg = torch_gn_twin(nl)
        n = sum(type(m) is nlnn.GroupNorm for m in nl.modules())
        fused = sum(type(m) is nlnn.GroupNorm and m.activation is not None for m in nl.modules())
        pairs.append(("gn", "torch GroupNorm", "normlab GroupNorm", tg, nl,
                      f"{n} GN, {fused} with an activation"))
    return pairs


def measure(models: dict, variants, layouts, threads, rounds: int, on_row=None) -> list[dict]:
    timm = import_timm()
    cpu, rows = cpu_name(), []
    for name, (kwargs, batch, img, has_bn, is_cnn) in models.items():
        pairs = build_pairs(timm, name, kwargs, has_bn, variants)
        torch.manual_seed(1)
        x0 = torch.randn(batch, 3, img, img)
        y = torch.randint(0, 10, (batch,))
        for layout in (layouts if is_cnn else ["nchw"]):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            x = x0.contiguous(memory_format=fmt)
            for variant, bl, cl, base, cand, record in pairs:
                base.to(memory_format=fmt), cand.to(memory_format=fmt)
                diff = _max_diff(base, cand, x)
                for t in threads:
                    torch.set_num_threads(t)
                    med = time_pair(base, cand, x, y, rounds)
                    for mode in ("train", "eval"):
                        b, c = med[("base", mode)], med[("cand", mode)]
                        row = {"model": name, "variant": variant, "base": bl, "cand": cl,
                               "mode": mode, "layout": layout if is_cnn else "tokens",
                               "threads": t, "batch": batch, "img": img,
                               "base_ms": round(b * 1e3, 2), "cand_ms": round(c * 1e3, 2),
                               "ratio": round(c / b, 3), "max_diff": f"{diff:.1e}",
                               "record": record, "cpu": cpu, "torch": torch.__version__}
                        rows.append(row)
                        print(f"{name:22s} {variant:8s} {row['layout']:6s} {t}t {mode:5s} "
                              f"base {b*1e3:8.1f} ms  cand {c*1e3:8.1f} ms  ratio {c/b:5.3f}  "
                              f"diff {diff:.1e}", flush=True)
                        if on_row:
                            on_row(rows)
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--variants", nargs="+", default=["optimize", "gn"], choices=["optimize", "gn"])
    ap.add_argument("--layouts", nargs="+", default=["nchw", "cl"], choices=["nchw", "cl"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--tiny", action="store_true", help="one tiny resnet18 case (for the tests)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu_models.csv"))
    args = ap.parse_args(argv)
    models = TINY if args.tiny else {k: MODELS[k] for k in args.models}
    print(f"torch {torch.__version__}, normlab {normlab.__version__}, {cpu_name()}, "
          f"threads {args.threads}, rounds {args.rounds}; ratio = cand / base", flush=True)
    rows = measure(models, args.variants, args.layouts, args.threads, args.rounds,
                   on_row=lambda r: write_csv(r, args.out))
    if rows:
        worst = max(rows, key=lambda r: r["ratio"])
        print(f"worst: {worst['model']} {worst['variant']} {worst['layout']} {worst['threads']}t "
              f"{worst['mode']} {worst['ratio']:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
