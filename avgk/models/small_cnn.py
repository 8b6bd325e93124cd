"""The small CNN backbone: a few seconds an epoch on a laptop CPU at 16-32 px."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """A CPU-friendly conv net for small images (tests, demo, synthetic data)."""

    def __init__(self, *, width: int = 64):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled: torch.Tensor = self.pool(self.features(x))
        return pooled.flatten(1)
