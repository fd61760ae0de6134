"""docs/recipes.md's commands run: each recipe block is run as written, on tiny generated data in
the recipe's format (CIFAR-10 python pickles; an image folder of PNGs), scaled down only in size:
1 seed, 1 epoch, the GN series, a few dozen images, 2 processes on 1 node for the several-node
recipes (gloo on the CPU), and the expected-time computation of benchmarks/recipe_throughput.py.
"""

import importlib.util
import json
import os
import pickle
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "docs" / "recipes.md"


def _recipes() -> dict[str, str]:
    """{name: command} of every ``<!-- recipe: name -->`` bash block (continuations joined)."""
    text = RECIPES.read_text()
    out = {}
    for name, body in re.findall(r"<!-- recipe: ([\w-]+) -->\n```bash\n(.*?)```", text, re.S):
        out[name] = body.replace("\\\n", " ").strip()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cifar(root: Path) -> Path:
    """CIFAR-10's python-version files, 24 images per training batch, 16 test images."""
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", 24) for i in range(1, 6)] + [("test_batch", 16)]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n).tolist()}, f)
    return d


def _imagefolder(root: Path) -> Path:
    """train/ and val/ with 3 classes of 24 and 6 PNGs (20x20, each class its own colour)."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 24), ("val", 6)):
        for k, cls in enumerate(("ant", "bee", "cat")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
                img[..., k] += 150
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root


# scaled-down sizes the test appends (later --set values win); the recipe's flags stay
# (GN only: the five batch sizes of one series run every flag of the recipe at half the cost)
# (no power rounds: the recipe's mechanics are tested here, tests/lab/test_power.py the rounds)
SMALL = ["--seeds", "1", "--variants", "GN", "--set", "epochs=1", "--set", "test_limit=16",
         "--budget-runs", "0"]
SMALL_IMAGES = 8   # image side for the imagefolder recipes: ResNet-50 at 8 px keeps them fast


@pytest.mark.parametrize("name", ["cifar10-one-gpu", "cifar10-nodes", "imagefolder-one-gpu",
                                  "imagefolder-nodes"])
def test_recipe_runs_on_tiny_data_of_its_format(name, tmp_path):
    cmd = _recipes()[name]
    env = {**os.environ, "CIFAR_DIR": str(_cifar(tmp_path / "cifar")),
           "IMAGES_DIR": str(_imagefolder(tmp_path / "images")), "OUT": str(tmp_path / "out"),
           "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}
    placeholders = {k: env[k] for k in ("CIFAR_DIR", "IMAGES_DIR", "OUT", "NODE_RANK",
                                         "MASTER_ADDR")}
    # an unknown placeholder is a KeyError: the table at the top of the recipes lists them all
    args = [re.sub(r"\$(\w+)", lambda m: placeholders[m.group(1)], a) for a in shlex.split(cmd)]
    assert args[:2] == ["normlab", "reproduce"]
    multi = "--nproc-per-node" in args
    size = {"--nproc-per-node": "2", "--nnodes": "1", "--master-port": str(_free_port())}
    args = [size.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    # one process emulates devices (the paper's 8 by default; 2 here: SGD batch 2 x N, up to 64
    # of the tiny sets' images)
    extra = SMALL + ["--set", "train_limit=64"] + ([] if multi else ["--devices", "2"])
    if "imagefolder" in name:
        extra += ["--set", f"data_kwargs.image_size={SMALL_IMAGES}"]
    if not multi:
        extra += ["--jobs", "1"]
    proc = subprocess.run([sys.executable, "-m", "normlab.lab.cli", *args[1:], *extra], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    out = tmp_path / "out"
    con = sqlite3.connect(out / "results.sqlite")
    rows = con.execute("SELECT status, config FROM runs").fetchall()
    con.close()
    cfgs = [json.loads(c) for _, c in rows]
    assert len(rows) == 5 and all(s == "done" for s, _ in rows)   # GN at 32..2
    data = "cifar10" if "cifar" in name else "imagefolder"
    assert {c["data"] for c in cfgs} == {data}
    assert {c["model"] for c in cfgs} == {"resnet50" if data == "imagefolder" else "resnet20"}
    assert {c["world_size"] for c in cfgs} == {2 if multi else 1}
    devices = 1 if multi else 2  # torchrun: the processes are the devices
    assert sorted({c["batch_size"] for c in cfgs}) == [devices * n for n in (2, 4, 8, 16, 32)]
    headings = [h for h in (out / "report.md").read_text().splitlines() if h.startswith("## ")]
    assert headings[0] == "## Summary"


def test_every_recipe_is_tested():
    assert set(_recipes()) == {"cifar10-one-gpu", "cifar10-nodes", "imagefolder-one-gpu",
                               "imagefolder-nodes"}


def _bench():
    spec = importlib.util.spec_from_file_location("_recipe_bench",
                                                  ROOT / "benchmarks" / "recipe_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_expected_time_is_epochs_times_images_over_throughput():
    b = _bench()
    # 160 epochs of CIFAR-10's 50,000 images at 1000 img/s: 8000 s; on 8 processes 1000 s
    assert b.expected_seconds(1000.0, 50_000, 160) == 8000.0
    assert b.expected_seconds(1000.0, 50_000, 160, processes=8) == 1000.0
    with pytest.raises(ValueError, match="images_per_s must be > 0"):
        b.expected_seconds(0.0, 50_000, 160)


def test_the_recipes_table_is_the_committed_measurement():
    """The table in docs/recipes.md is what --estimate prints for the committed CSV."""
    b = _bench()
    table = b.estimate(str(ROOT / "benchmarks" / "results" / "recipe_throughput_cpu.csv"))
    assert table in RECIPES.read_text()
