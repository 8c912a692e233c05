"""Each model builds and trains a step; each dataset loads through its real loader from real-format files."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from raytopk import data
from raytopk.data import DATASETS, DatasetError, load_dataset
from raytopk.models import MODELS, build_model

from cluster import free_ports


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_model_trains_a_step(name, channels, size):
    model = build_model(name, channels, 10, size)
    x, y = torch.randn(2, channels, size, size), torch.tensor([1, 7])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet_has_the_small_image_stem():
    model = build_model("resnet18", 3, 10, 32)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_resnet20_is_cifars_twenty_layer_network():
    """He et al.'s CIFAR ResNet-20: 19 convolutions and one linear layer, 0.27M parameters, 64 features pooled."""
    model = build_model("resnet20", 3, 10, 32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) == 19 and len(linears) == 1 and linears[0].in_features == 64
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert [c.out_channels for c in convs[1::6]] == [16, 32, 64]  # the first block of each stage


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown model 'vgg'; known models: resnet18, resnet20, resnet50, simple_cnn, vit"
    ):
        build_model("vgg")


def test_mnist5k_is_real_and_split_400_100_per_class():
    train, test = load_dataset("mnist5k", "unused")
    assert (len(train), len(test)) == (4000, 1000)
    labels = torch.stack([y for _, y in test])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 100))
    image = train[0][0]
    assert image.shape == (1, 28, 28) and image.std() > 0.5  # real strokes, normalized


def _write_idx(folder, prefix, n, gz=False):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    images = np.array([2051, n, 28, 28], ">i4").tobytes() + rng.integers(0, 255, n * 784, dtype=np.uint8).tobytes()
    labels = np.array([2049, n], ">i4").tobytes() + (np.arange(n) % 10).astype(np.uint8).tobytes()
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    for name, payload in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        with opener(os.path.join(folder, name + suffix), "wb") as f:
            f.write(payload)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_idx_files_load(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    _write_idx(raw, "train", 30)
    _write_idx(raw, "t10k", 10)
    train, test = load_dataset(name, str(tmp_path))
    assert (len(train), len(test)) == (30, 10)
    x, y = train[3]
    assert x.shape == (1, 28, 28) and y == 3


def test_fashion_mnist_found_in_the_debian_package_layout(tmp_path, monkeypatch):
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    _write_idx(debian, "train", 20, gz=True)
    _write_idx(debian, "t10k", 10, gz=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(debian))
    train, test = load_dataset("fashion_mnist", str(tmp_path / "data"))
    assert (len(train), len(test)) == (20, 10)


def _write_cifar(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8), "labels": list(range(per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_python_pickles_load(tmp_path):
    _write_cifar(tmp_path)
    train, test = load_dataset("cifar10", str(tmp_path))
    assert (len(train), len(test)) == (20, 4)
    x, y = train[1]
    assert x.shape == (3, 32, 32) and y == 1
    assert DATASETS["cifar10"].in_channels == 3


def test_truncated_dataset_file_is_a_clear_error(tmp_path):
    folder = _write_cifar(tmp_path)
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    with pytest.raises(DatasetError, match="CIFAR10 not found or unreadable under"):
        load_dataset("cifar10", str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_dataset_says_where_and_how(tmp_path, name, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=f"under {tmp_path}.*pass --download"):
        load_dataset(name, str(tmp_path))


def test_a_failed_download_is_one_line_naming_each_mirror_tried(tmp_path, monkeypatch):
    """torchvision's error lists every mirror on a line of its own; the user error stays one line."""
    import torchvision

    (port,) = free_ports(1)  # nothing listens there: the download fails at once, network or not
    monkeypatch.setattr(
        torchvision.datasets.MNIST, "mirrors", [f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"]
    )
    with pytest.raises(DatasetError) as err:
        load_dataset("mnist", str(tmp_path), download=True)
    message = str(err.value)
    assert "\n" not in message and message.endswith("check the network and the directory"), message
    assert f"Tried http://127.0.0.1:{port}/a/" in message and f"Tried http://127.0.0.1:{port}/b/" in message


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DatasetError, match="known datasets: cifar10, fashion_mnist, mnist, mnist5k"):
        load_dataset("imagenet", "x")
