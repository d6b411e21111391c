"""JAX versions (flax.linen) of the models of :mod:`sam_edu.models` (architectures, references
and conventions are described there). Models take NHWC arrays and return float32 logits.

Each model is called as ``model.apply(variables, x, train=...)``. BatchNorm keeps its running
statistics in the ``"batch_stats"`` collection and uses them when ``train`` is False; with
``train=True`` it normalises with the batch statistics and updates the running ones, so pass
``mutable=["batch_stats"]``::

    model = build("resnet18", (32, 32, 3), 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

``dtype`` is the *compute* dtype (e.g. ``jnp.bfloat16``); parameters are always float32, and
BatchNorm reduces in float32. Submodule names (``conv1``, ``bn1``, ``layer2_0`` > ``shortcut_conv``,
``fc``) match the PyTorch and Keras versions.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sam_edu.models import (
    WIDE_RESNETS,
    check_input_shape,
    check_name,
    check_num_classes,
    check_wide_resnet_arguments,
)

__all__ = ["BasicBlock", "ResNet18", "SmallCNN", "WideBasicBlock", "WideResNet", "build",
           "count_params", "resnet18", "small_cnn", "wide_resnet"]

# He/Kaiming normal, fan_out: std = sqrt(2 / (out_channels * kernel height * kernel width))
_he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel_size, stride, dtype, name):
    """A conv without bias (BatchNorm follows); a 3x3 conv pads one pixel on every side, as
    PyTorch's ``padding=1`` does (``"SAME"`` pads only bottom/right at stride 2, even size)."""
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=stride,
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_he_normal,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def _batch_norm(train, dtype, name):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def _classifier(x, num_classes, dtype):
    """Global average pool, then the linear layer (flax's default init); float32 logits."""
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="fc")(x)
    return x.astype(jnp.float32)


class SmallCNN(nn.Module):
    """conv3x3(32)-BN-ReLU, conv3x3(64)-BN-ReLU, 2x2 max-pool, conv3x3(128)-BN-ReLU, global
    average pool, linear."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(_conv(32, 3, 1, self.dtype, "conv1")(x)))
        x = nn.relu(_batch_norm(train, self.dtype, "bn2")(_conv(64, 3, 1, self.dtype, "conv2")(x)))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(_batch_norm(train, self.dtype, "bn3")(_conv(128, 3, 1, self.dtype, "conv3")(x)))
        return _classifier(x, self.num_classes, self.dtype)


class BasicBlock(nn.Module):
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut
    is a 1x1 conv + BN when the block changes the shape, else the identity."""

    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        out = nn.relu(_batch_norm(train, self.dtype, "bn1")(out))
        out = _conv(self.features, 3, 1, self.dtype, "conv2")(out)
        out = _batch_norm(train, self.dtype, "bn2")(out)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, self.stride, self.dtype, "shortcut_conv")(x)
            shortcut = _batch_norm(train, self.dtype, "shortcut_bn")(shortcut)
        return nn.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18, CIFAR form: 3x3 stride-1 stem, no max-pool, stages of 2 basic blocks with 64,
    128, 256, 512 channels (stages 2-4 start with stride 2), global average pool, linear."""

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(_conv(64, 3, 1, self.dtype, "conv1")(x)))
        for stage, features in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if stage == 1 else 2
            x = BasicBlock(features, stride, self.dtype, name=f"layer{stage}_0")(x, train)
            x = BasicBlock(features, 1, self.dtype, name=f"layer{stage}_1")(x, train)
        return _classifier(x, self.num_classes, self.dtype)


class WideBasicBlock(nn.Module):
    """Wide ResNet's pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut.
    When the block changes the shape, the shortcut is a 1x1 conv of relu(bn1(x)), else x."""

    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        out = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = _conv(self.features, 1, self.stride, self.dtype, "shortcut_conv")(out)
        out = _conv(self.features, 3, self.stride, self.dtype, "conv1")(out)
        out = nn.relu(_batch_norm(train, self.dtype, "bn2")(out))
        out = _conv(self.features, 3, 1, self.dtype, "conv2")(out)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem conv (16 channels), three groups of (depth - 4) / 6 wide basic
    blocks with 16k, 32k, 64k channels (groups 2 and 3 start with stride 2), BN-ReLU, global
    average pool, linear."""

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        blocks_per_group = check_wide_resnet_arguments(self.depth, self.widen_factor)
        x = _conv(16, 3, 1, self.dtype, "conv1")(x)
        for group, width in enumerate((16, 32, 64), start=1):
            for block in range(blocks_per_group):
                stride = 2 if group > 1 and block == 0 else 1
                x = WideBasicBlock(width * self.widen_factor, stride, self.dtype,
                                   name=f"layer{group}_{block}")(x, train)
        x = nn.relu(_batch_norm(train, self.dtype, "bn")(x))
        return _classifier(x, self.num_classes, self.dtype)


def small_cnn(input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """The small CNN; ``input_shape`` ``(H, W, C)`` is only checked (flax infers shapes at
    ``init``); ``dtype``: compute dtype, float32 if None."""
    check_input_shape(input_shape, min_size=2)  # H, W >= 2 for the max-pool
    check_num_classes(num_classes)
    return SmallCNN(num_classes, jnp.float32 if dtype is None else dtype)


def resnet18(input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """ResNet-18 (CIFAR form); arguments as for :func:`small_cnn`."""
    check_input_shape(input_shape)
    check_num_classes(num_classes)
    return ResNet18(num_classes, jnp.float32 if dtype is None else dtype)


def wide_resnet(depth, widen_factor, input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """WRN-``depth``-``widen_factor``; other arguments as for :func:`small_cnn`."""
    check_input_shape(input_shape)
    check_num_classes(num_classes)
    check_wide_resnet_arguments(depth, widen_factor)
    return WideResNet(depth, widen_factor, num_classes, jnp.float32 if dtype is None else dtype)


def build(name, input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """The model ``name`` (one of ``sam_edu.models.MODELS``) as a ``flax.linen.Module`` called
    as ``model.apply(variables, x_nhwc, train=...)``. ``dtype``: compute dtype (e.g.
    ``jnp.bfloat16``), float32 if None; parameters stay float32."""
    check_name(name)
    if name == "small-cnn":
        return small_cnn(input_shape, num_classes, dtype=dtype)
    if name == "resnet18":
        return resnet18(input_shape, num_classes, dtype=dtype)
    return wide_resnet(*WIDE_RESNETS[name], input_shape, num_classes, dtype=dtype)


def count_params(params):
    """The number of trainable parameters: the leaves of ``params``, or of ``params["params"]``
    when given all the variables (``batch_stats`` are not trained). Works on the shapes that
    ``jax.eval_shape(model.init, ...)`` returns, so a big model can be counted unallocated."""
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
