"""Models by name: a small CNN and torchvision's ResNets adapted to small images.

``build_model(name, in_channels, num_classes, image_size)`` is the one entry
point; an unknown name is a one-line error that lists the known ones.
"""

import torch
from torch import nn

__all__ = ["MODELS", "build_model"]


class SimpleCNN(nn.Module):
    """Two conv blocks and two linear layers: about 0.4M parameters for 28x28 inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _small_image_resnet(factory, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision ResNet with the CIFAR-style stem: 3x3 conv, stride 1, no max-pool.

    The ImageNet stem (7x7 stride 2 plus max-pool) shrinks a 32x32 image to 8x8
    before the first block; small-image papers replace it so the blocks see
    the full resolution.
    """
    model = factory(num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _resnet18(in_channels, num_classes, image_size):
    from torchvision.models import resnet18

    return _small_image_resnet(resnet18, in_channels, num_classes)


def _resnet50(in_channels, num_classes, image_size):
    from torchvision.models import resnet50

    return _small_image_resnet(resnet50, in_channels, num_classes)


MODELS = {"simple_cnn": SimpleCNN, "resnet18": _resnet18, "resnet50": _resnet50}


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """The model called ``name``, for images of ``in_channels`` x ``image_size`` x ``image_size``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](in_channels, num_classes, image_size)
