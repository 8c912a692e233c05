"""The architectures behind :mod:`raytopk.models`' names: a small CNN, CIFAR's ResNet-20, torchvision's ResNets
adapted to small images, and a small ViT. Each takes ``(in_channels, num_classes, image_size)``.
"""

import torch
from torch import nn

__all__ = ["SimpleCNN", "ResNet20", "SmallViT", "small_resnet18", "small_resnet50"]


class SimpleCNN(nn.Module):
    """Two conv blocks and two linear layers: about 0.4M parameters for 28x28 inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
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


def small_resnet18(in_channels, num_classes, image_size):
    from torchvision.models import resnet18

    return _small_image_resnet(resnet18, in_channels, num_classes)


def small_resnet50(in_channels, num_classes, image_size):
    from torchvision.models import resnet50

    return _small_image_resnet(resnet50, in_channels, num_classes)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm; the shortcut subsamples and pads channels with zeros (no weights)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return torch.relu(out + shortcut)


class ResNet20(nn.Module):
    """CIFAR's ResNet-20 (He et al., 2016, section 4.2): the residual network of DGC's and many compression papers'
    CIFAR runs.

    A 3x3 convolution to 16 channels, then three stages of three basic blocks
    at 16, 32 and 64 channels (the second and third halve the resolution),
    global average pooling and one linear layer: 20 weighted layers, about
    0.27M parameters. Shortcuts that change shape subsample and pad with zero
    channels (the paper's option A), so every parameter is in a convolution,
    a batch norm or the classifier.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                stages.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


class SmallViT(nn.Module):
    """A Vision Transformer for small images: 4x4 patches, 4 pre-norm encoder layers of width 64.

    The image is cut into a 4x4 grid of patches (7x7 pixels each for 28x28
    inputs), each embedded linearly (a strided convolution), with a learned
    class token and position embedding; the class token's final state is
    classified. About 0.14M parameters, nearly all in attention and MLP
    weights, plus dozens of small 1-D LayerNorm and bias vectors: a gradient
    that sparsifies differently from a CNN's.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        grid: int = 4,
        width: int = 64,
        depth: int = 4,
        heads: int = 4,
    ):
        super().__init__()
        patch = image_size // grid
        self.embed = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, grid * grid + 1, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (batch, patches, width)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.encoder(tokens)[:, 0]))
