"""Training throughput of the recipes in docs/recipes.md, measured with the lab itself, and the
expected time per run computed from it.

Each case trains one `normlab train` run (the recipe's model, norm and per-process batch) for
``--steps`` optimizer steps on synthetic data of the recipe's image shape and class count, in a
scratch store, and reads the run's training images/s back from the store (training images over
training time; evaluation excluded). So the number is what the recipe's runs will see on this
device, minus the real data's loading (in memory for every dataset: benchmarks/loader.py measured
the loader at >100x a training step).

    python benchmarks/recipe_throughput.py [--device cpu|cuda] [--steps 64] [--cases cifar imagenet64]
                                           [--out benchmarks/results/recipe_throughput_<device>.csv]
    python benchmarks/recipe_throughput.py --estimate benchmarks/results/recipe_throughput_cpu.csv

The expected time of a run is a computation, not a measurement:
``epochs * train_images / (images_per_s * processes)`` (:func:`expected_seconds`), with
``processes`` the total over nodes and perfect scaling assumed (DDP adds one all-reduce per step;
on small per-process batches that overhead is not negligible, so the multi-process figure is a
lower bound).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: the recipes' datasets: training images, image side, classes, epochs (docs/recipes.md)
DATASETS = {
    "cifar10": {"train_images": 50_000, "image_size": 32, "num_classes": 10, "epochs": 160},
    "imagenet64": {"train_images": 1_281_167, "image_size": 64, "num_classes": 1000,
                   "epochs": 100},
}
#: measured cases: dataset -> (model, norms, per-process batches)
CASES = {
    "cifar": ("cifar10", "resnet20", ("bn", "gn"), (32, 8, 2)),
    "imagenet64": ("imagenet64", "resnet50", ("bn", "gn"), (32, 2)),
}
FIELDS = ("device", "threads", "load_avg_1min", "dataset", "model", "norm", "batch",
          "image_size", "num_classes", "steps", "images_per_s", "torch", "measured_utc")


def expected_seconds(images_per_s: float, train_images: int, epochs: int,
                     processes: int = 1) -> float:
    """Seconds for ``epochs`` passes over ``train_images`` at ``images_per_s`` per process, on
    ``processes`` processes with perfect scaling (a lower bound for DDP)."""
    if images_per_s <= 0 or processes < 1:
        raise ValueError(f"images_per_s must be > 0 and processes >= 1, got {images_per_s}, "
                         f"{processes}")
    return epochs * train_images / (images_per_s * processes)


def measure(dataset: str, model: str, norm: str, batch: int, steps: int, device: str,
            workdir: Path) -> float:
    """Training images/s of one `normlab train` run of ``steps`` steps (read from its store)."""
    d = DATASETS[dataset]
    kwargs = {"n_train": batch * steps, "n_test": 64, "image_size": d["image_size"],
              "channels": 3, "num_classes": d["num_classes"]}
    out = workdir / f"{dataset}-{model}-{norm}-{batch}"
    cmd = [sys.executable, "-m", "normlab.lab.cli", "train", "--data", "synthetic", "--model",
           model, "--norm", norm, "--batch-size", str(batch),
           "--epochs", "1", "--device", device, "--out", str(out),
           "--set", f"data_kwargs={json.dumps(kwargs)}", "--set", "augment=on"]
    if norm == "gn":
        cmd += ["--set", 'norm_kwargs={"num_groups": 8}' if dataset == "cifar10"
                else 'norm_kwargs={"num_groups": 32}']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    con = sqlite3.connect(out / "results.sqlite")
    try:
        (ips,) = con.execute("SELECT images_per_s FROM runs").fetchone()
    finally:
        con.close()
    return float(ips)


def run(args: argparse.Namespace) -> Path:
    import torch

    device = args.device
    name = "cpu" if device == "cpu" else torch.cuda.get_device_name(0).replace(" ", "_")
    out = Path(args.out or f"benchmarks/results/recipe_throughput_{name}.csv")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            dataset, model, norms, batches = CASES[case]
            for norm in norms:
                for batch in batches:
                    steps = args.steps if dataset == "cifar10" else max(4, args.steps // 4)
                    ips = measure(dataset, model, norm, batch, steps, device, Path(tmp))
                    d = DATASETS[dataset]
                    rows.append({"device": name, "threads": torch.get_num_threads(),
                                 "load_avg_1min": round(os.getloadavg()[0], 2),
                                 "dataset": dataset, "model": model, "norm": norm,
                                 "batch": batch, "image_size": d["image_size"],
                                 "num_classes": d["num_classes"], "steps": steps,
                                 "images_per_s": round(ips, 1), "torch": torch.__version__,
                                 "measured_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime())})
                    print(f"{dataset} {model} {norm} batch {batch}: {ips:.1f} img/s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".csv.tmp")
    with open(tmp_out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp_out, out)
    print(f"wrote {out} ({platform.node()})")
    return out


def estimate(path: str, processes: tuple[int, ...] = (1, 8)) -> str:
    """A markdown table of the expected hours per run for every measured row."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    head = ("| device | model | norm | images per process | measured img/s | epochs x train "
            "images | " + " | ".join(f"hours on {p} process(es)" for p in processes) + " |")
    lines = [head, "|---" * (6 + len(processes)) + "|"]
    for r in rows:
        d = DATASETS[r["dataset"]]
        ips = float(r["images_per_s"])
        hours = [expected_seconds(ips, d["train_images"], d["epochs"], p) / 3600
                 for p in processes]
        lines.append(f"| {r['device']} ({r['threads']} threads) | {r['model']} ({r['dataset']}) | "
                     f"{r['norm']} | {r['batch']} | {ips:g} | {d['epochs']} x "
                     f"{d['train_images']:,} | " + " | ".join(f"{h:,.1f}" for h in hours) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=64, help="steps per CIFAR case (imagenet64: /4)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--estimate", metavar="CSV", help="print expected hours per run from a CSV")
    args = ap.parse_args(argv)
    if args.estimate:
        print(estimate(args.estimate))
    else:
        run(args)


if __name__ == "__main__":
    main()
