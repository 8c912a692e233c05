"""Models by name: a small CNN, CIFAR's ResNet-20, torchvision's ResNets adapted to small images, and a small ViT.

``build_model(name, in_channels, num_classes, image_size)`` is the one entry
point; an unknown name is a one-line error that lists the known ones. The
registry names each model's builder in :mod:`raytopk.architectures`, so checking
a job's ``model`` key does not import PyTorch.
"""

import importlib

__all__ = ["MODELS", "build_model"]

MODELS = {
    "simple_cnn": "SimpleCNN",
    "resnet20": "ResNet20",
    "resnet18": "small_resnet18",
    "resnet50": "small_resnet50",
    "vit": "SmallViT",
}


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
    """The model called ``name`` (a ``torch.nn.Module``), for images of ``in_channels`` x ``image_size`` x
    ``image_size``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    builder = getattr(importlib.import_module("raytopk.architectures"), MODELS[name])
    return builder(in_channels, num_classes, image_size)
