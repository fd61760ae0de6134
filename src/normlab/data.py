"""normlab.data: the lab's datasets and tensor loader (re-exported from :mod:`normlab.lab.data`)."""

from normlab.lab.data import (CIFAR_EXPECTED, DataError, DataSplit, TensorLoader, load_dataset,
                              pad_crop_flip)

__all__ = ["CIFAR_EXPECTED", "DataError", "DataSplit", "TensorLoader", "load_dataset",
           "pad_crop_flip"]
