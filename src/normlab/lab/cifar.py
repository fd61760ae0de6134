"""CIFAR-10 and CIFAR-100 from their "python version" archives, extracted (see
:mod:`normlab.lab.data`'s docstring for the layout). The files are pickles: they are read by an
unpickler that accepts numpy arrays, lists, bytes and numbers only and refuses a file naming
anything else, so a planted pickle cannot run code through it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normlab.lab.datasets import DataError, DataSplit, _standardize

__all__ = ["CIFAR_EXPECTED", "cifar", "cifar_hint"]

#: name -> (subdirectory, train files, test files, label key, number of classes)
CIFAR_EXPECTED = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def _cifar_dir(name: str, data_dir: Path) -> Path:
    sub, train_files, test_files, _, _ = CIFAR_EXPECTED[name]
    want = train_files + test_files
    for cand in (data_dir, data_dir / sub):
        if all((cand / f).is_file() for f in want):
            return cand
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise DataError(f"{name}: data directory {str(data_dir)!r} {what}",
                        hint=cifar_hint(name, data_dir))
    root = data_dir / sub if (data_dir / sub).is_dir() else data_dir
    missing = [f for f in want if not (root / f).is_file()]
    other = _other_cifar(name, data_dir)
    raise DataError(f"{name}: {str(root)!r} is missing {', '.join(missing)}"
                    + (f"; it holds {other} (--data {other})" if other else ""),
                    hint=cifar_hint(name, data_dir))


def _other_cifar(name: str, data_dir: Path) -> str:
    """The other CIFAR whose files ``data_dir`` holds (the wrong --data for it), or ''."""
    for other, (sub, train_files, test_files, _, _) in CIFAR_EXPECTED.items():
        if other != name and any(all((cand / f).is_file() for f in train_files + test_files)
                                 for cand in (data_dir, data_dir / sub)):
            return other
    return ""


def cifar_hint(name: str, data_dir: Path) -> str:
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
                        hint=cifar_hint(name, path.parent)) from None
    if not isinstance(d, dict):
        raise DataError(f"{name}: {str(path)!r} holds a {type(d).__name__}, expected a dict with "
                        f"b'data' and {label_key!r}", hint=cifar_hint(name, path.parent))
    d = {(k.encode() if isinstance(k, str) else k): v for k, v in d.items()}
    if b"data" not in d or label_key not in d:
        raise DataError(f"{name}: {str(path)!r} lacks key(s) "
                        f"{[k for k in (b'data', label_key) if k not in d]}; found {sorted(d)[:6]}",
                        hint=cifar_hint(name, path.parent))
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[label_key])
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise DataError(f"{name}: {str(path)!r} has data of shape {data.shape} dtype {data.dtype}, "
                        f"expected (n, 3072) uint8", hint=cifar_hint(name, path.parent))
    if data.shape[0] == 0:
        raise DataError(f"{name}: {str(path)!r} holds no images",
                        hint=cifar_hint(name, path.parent))
    if labels.shape != (data.shape[0],):
        raise DataError(f"{name}: {str(path)!r} has {labels.shape} labels for {data.shape[0]} images",
                        hint=cifar_hint(name, path.parent))
    ncls = CIFAR_EXPECTED[name][4]
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}: {str(path)!r} has labels of type {labels.dtype}, expected "
                        f"integers 0..{ncls - 1}", hint=cifar_hint(name, path.parent))
    if labels.min() < 0 or labels.max() >= ncls:
        raise DataError(f"{name}: {str(path)!r} has labels outside 0..{ncls - 1}",
                        hint=cifar_hint(name, path.parent))
    return data, labels


def cifar(name: str, data_dir: Path) -> DataSplit:
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

