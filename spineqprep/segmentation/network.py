"""The 2D U-Net that segments sagittal slices (background, vertebral body, sacrum, disc).

Small on purpose (about 1 M parameters at 16 base filters and depth 4) so that it trains on
two CPU cores in minutes and ships inside the package. The architecture is fully described by
the ``architecture`` dictionary of a bundle's ``model.json``; ``build_network`` rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from spineqprep.errors import InputError

#: Filters are doubled per level up to this cap (keeps the bottleneck, and the file, small).
MAX_FILTERS = 128


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3 x 3 convolutions, each followed by batch normalisation and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True))


class UNet2d(nn.Module):
    """U-Net: ``depth`` poolings, skip connections by concatenation, logits out.

    Input (batch, in_channels, H, W) with H and W multiples of ``2 ** depth``; output
    (batch, n_classes, H, W) logits.
    """

    def __init__(self, in_channels: int = 1, base_filters: int = 16, depth: int = 4,
                 n_classes: int = 4):
        super().__init__()
        widths = [min(base_filters * 2 ** i, MAX_FILTERS) for i in range(depth + 1)]
        self.depth = depth
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.merge.append(_block(2 * w, w))
            c = w
        self.head = nn.Conv2d(c, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build_network(architecture: Mapping[str, Any]) -> nn.Module:
    """The network a bundle's ``architecture`` describes (``type`` must be ``unet2d``)."""
    if architecture.get("type") != "unet2d":
        raise InputError(f"unknown network type {architecture.get('type')!r}",
                         fix="use a bundle whose model.json architecture.type is 'unet2d'")
    try:
        return UNet2d(in_channels=int(architecture["in_channels"]),
                      base_filters=int(architecture["base_filters"]),
                      depth=int(architecture["depth"]),
                      n_classes=int(architecture["n_classes"]))
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"incomplete network architecture {dict(architecture)}: {err}",
                         fix="model.json architecture needs in_channels, base_filters, depth "
                             "and n_classes (integers)") from err


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
