"""PyTorch versions of the models of :mod:`sam_edu.models` (architectures, references and
conventions are described there). Models take NCHW float tensors and return logits.

``build(name, input_shape, num_classes)`` returns an ``nn.Module`` with float32 parameters; mixed
precision is ``torch.autocast``'s job, so ``dtype`` only changes the parameters' dtype (e.g.
``torch.float64``). Submodule names (``conv1``, ``bn1``, ``layer2.0.shortcut_conv``, ``fc``)
match the flax and Keras versions, with ``_`` for ``.`` there.
"""

import torch
from torch import nn

from sam_edu.models import (
    WIDE_RESNETS,
    check_input_shape,
    check_name,
    check_num_classes,
    check_wide_resnet_arguments,
)

__all__ = ["BasicBlock", "ResNet18", "SmallCNN", "WideBasicBlock", "WideResNet", "build",
           "count_params", "resnet18", "small_cnn", "wide_resnet"]


def _conv(in_channels, out_channels, kernel_size, stride=1):
    """A conv without bias (BatchNorm follows); a 3x3 conv pads one pixel on every side."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=kernel_size // 2, bias=False)


def _batch_norm(channels):
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=0.1)


def _he_init(model):
    """He/Kaiming normal init, fan_out, for every conv (BatchNorm starts at gamma 1, beta 0 and
    the linear layer keeps PyTorch's default)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model


class SmallCNN(nn.Module):
    """conv3x3(32)-BN-ReLU, conv3x3(64)-BN-ReLU, 2x2 max-pool, conv3x3(128)-BN-ReLU, global
    average pool, linear."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = _conv(in_channels, 32, 3), _batch_norm(32)
        self.conv2, self.bn2 = _conv(32, 64, 3), _batch_norm(64)
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.bn3 = _conv(64, 128, 3), _batch_norm(128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut
    is a 1x1 conv + BN when the block changes the shape, else the identity."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.bn1 = _batch_norm(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.bn2 = _batch_norm(out_channels)
        self.shortcut_conv = self.shortcut_bn = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut_conv = _conv(in_channels, out_channels, 1, stride)
            self.shortcut_bn = _batch_norm(out_channels)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x))
        return torch.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18, CIFAR form: 3x3 stride-1 stem, no max-pool, stages of 2 basic blocks with 64,
    128, 256, 512 channels (stages 2-4 start with stride 2), global average pool, linear."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = _conv(in_channels, 64, 3), _batch_norm(64)
        self.layer1 = nn.Sequential(BasicBlock(64, 64, 1), BasicBlock(64, 64, 1))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128, 1))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256, 1))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512, 1))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class WideBasicBlock(nn.Module):
    """Wide ResNet's pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut.
    When the block changes the shape, the shortcut is a 1x1 conv of relu(bn1(x)), else x."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1, self.conv1 = _batch_norm(in_channels), _conv(in_channels, out_channels, 3, stride)
        self.bn2, self.conv2 = _batch_norm(out_channels), _conv(out_channels, out_channels, 3)
        self.shortcut_conv = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut_conv = _conv(in_channels, out_channels, 1, stride)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut_conv is None else self.shortcut_conv(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem conv (16 channels), three groups of (depth - 4) / 6 wide basic
    blocks with 16k, 32k, 64k channels (groups 2 and 3 start with stride 2), BN-ReLU, global
    average pool, linear."""

    def __init__(self, depth=28, widen_factor=10, in_channels=3, num_classes=10):
        super().__init__()
        blocks_per_group = check_wide_resnet_arguments(depth, widen_factor)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv(in_channels, widths[0], 3)
        self.layer1 = self._group(widths[0], widths[1], 1, blocks_per_group)
        self.layer2 = self._group(widths[1], widths[2], 2, blocks_per_group)
        self.layer3 = self._group(widths[2], widths[3], 2, blocks_per_group)
        self.bn = _batch_norm(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _group(in_channels, out_channels, stride, num_blocks):
        blocks = [WideBasicBlock(in_channels, out_channels, stride)]
        blocks += [WideBasicBlock(out_channels, out_channels, 1) for _ in range(num_blocks - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = torch.relu(self.bn(x))
        return self.fc(x.mean(dim=(2, 3)))


def small_cnn(input_shape=(32, 32, 3), num_classes=10):
    """The small CNN for ``input_shape`` ``(H, W, C)``, He-initialised."""
    channels = check_input_shape(input_shape, min_size=2)[2]  # H, W >= 2 for the max-pool
    check_num_classes(num_classes)
    return _he_init(SmallCNN(channels, num_classes))


def resnet18(input_shape=(32, 32, 3), num_classes=10):
    """ResNet-18 (CIFAR form) for ``input_shape`` ``(H, W, C)``, He-initialised."""
    channels = check_input_shape(input_shape)[2]
    check_num_classes(num_classes)
    return _he_init(ResNet18(channels, num_classes))


def wide_resnet(depth, widen_factor, input_shape=(32, 32, 3), num_classes=10):
    """WRN-``depth``-``widen_factor`` for ``input_shape`` ``(H, W, C)``, He-initialised."""
    channels = check_input_shape(input_shape)[2]
    check_num_classes(num_classes)
    return _he_init(WideResNet(depth, widen_factor, channels, num_classes))


def build(name, input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """The model ``name`` (one of ``sam_edu.models.MODELS``) as an ``nn.Module`` taking NCHW
    input. ``dtype``: the parameters' dtype, float32 if None (use ``torch.autocast`` for mixed
    precision, not this)."""
    check_name(name)
    if name == "small-cnn":
        model = small_cnn(input_shape, num_classes)
    elif name == "resnet18":
        model = resnet18(input_shape, num_classes)
    else:
        model = wide_resnet(*WIDE_RESNETS[name], input_shape, num_classes)
    return model if dtype is None else model.to(dtype)


def count_params(model):
    """The number of trainable parameters of ``model`` (BatchNorm's running statistics are
    buffers, not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
