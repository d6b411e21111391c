"""Keras 3 versions (functional API, TensorFlow backend) of the models of :mod:`sam_edu.models`
(architectures, references and conventions are described there). Models take NHWC arrays and
return float32 logits.

``dtype`` is a Keras dtype policy (a name such as ``"mixed_bfloat16"``, or a
``keras.DTypePolicy``) given to every layer; None leaves each layer on the global policy
(``keras.config.set_dtype_policy``). Variables stay float32 under the mixed policies, and a final
float32 ``"logits"`` activation casts the output back, as the Keras mixed-precision guide advises.
Layer names (``conv1``, ``bn1``, ``layer2_0_shortcut_conv``, ``fc``) are the PyTorch module names
with ``_`` for ``.``.
"""

import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from keras import layers  # noqa: E402

from sam_edu.models import (  # noqa: E402
    WIDE_RESNETS,
    check_input_shape,
    check_name,
    check_num_classes,
    check_wide_resnet_arguments,
)

__all__ = ["build", "count_params", "resnet18", "small_cnn", "wide_resnet"]


def _conv(x, filters, kernel_size, stride, name, dtype):
    """A conv without bias (BatchNorm follows), He normal (fan_out). A 3x3 conv pads one pixel on
    every side, as PyTorch's ``padding=1`` does: ``"same"`` does that at stride 1, but at stride
    2 on an even size it would pad only bottom/right, so there the padding is explicit."""
    padding = "valid" if kernel_size == 1 else "same"
    if kernel_size == 3 and stride == 2:
        x = layers.ZeroPadding2D(1, dtype=dtype, name=f"{name}_pad")(x)
        padding = "valid"
    he_normal = keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")
    return layers.Conv2D(filters, kernel_size, strides=stride, padding=padding, use_bias=False,
                         kernel_initializer=he_normal, dtype=dtype, name=name)(x)


def _batch_norm(x, name, dtype):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)(x)


def _relu(x, dtype):
    return layers.ReLU(dtype=dtype)(x)


def _classifier(x, num_classes, dtype):
    """Global average pool, the linear layer (Keras' default init), float32 logits."""
    x = layers.GlobalAveragePooling2D(dtype=dtype)(x)
    x = layers.Dense(num_classes, dtype=dtype, name="fc")(x)
    return layers.Activation("linear", dtype="float32", name="logits")(x)


def small_cnn(input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """The small CNN: conv3x3(32)-BN-ReLU, conv3x3(64)-BN-ReLU, 2x2 max-pool,
    conv3x3(128)-BN-ReLU, global average pool, linear."""
    input_shape = check_input_shape(input_shape, min_size=2)  # H, W >= 2 for the max-pool
    check_num_classes(num_classes)
    inputs = keras.Input(input_shape)
    x = _relu(_batch_norm(_conv(inputs, 32, 3, 1, "conv1", dtype), "bn1", dtype), dtype)
    x = _relu(_batch_norm(_conv(x, 64, 3, 1, "conv2", dtype), "bn2", dtype), dtype)
    x = layers.MaxPooling2D(2, dtype=dtype)(x)
    x = _relu(_batch_norm(_conv(x, 128, 3, 1, "conv3", dtype), "bn3", dtype), dtype)
    return keras.Model(inputs, _classifier(x, num_classes, dtype), name="small_cnn")


def _basic_block(x, filters, stride, name, dtype):
    """ResNet's basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut
    is a 1x1 conv + BN when the block changes the shape, else the identity."""
    out = _conv(x, filters, 3, stride, f"{name}_conv1", dtype)
    out = _relu(_batch_norm(out, f"{name}_bn1", dtype), dtype)
    out = _batch_norm(_conv(out, filters, 3, 1, f"{name}_conv2", dtype), f"{name}_bn2", dtype)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(x, filters, 1, stride, f"{name}_shortcut_conv", dtype)
        shortcut = _batch_norm(shortcut, f"{name}_shortcut_bn", dtype)
    return _relu(layers.Add(dtype=dtype)([out, shortcut]), dtype)


def resnet18(input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """ResNet-18, CIFAR form: 3x3 stride-1 stem, no max-pool, stages of 2 basic blocks with 64,
    128, 256, 512 channels (stages 2-4 start with stride 2), global average pool, linear."""
    input_shape = check_input_shape(input_shape)
    check_num_classes(num_classes)
    inputs = keras.Input(input_shape)
    x = _relu(_batch_norm(_conv(inputs, 64, 3, 1, "conv1", dtype), "bn1", dtype), dtype)
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        x = _basic_block(x, filters, 1 if stage == 1 else 2, f"layer{stage}_0", dtype)
        x = _basic_block(x, filters, 1, f"layer{stage}_1", dtype)
    return keras.Model(inputs, _classifier(x, num_classes, dtype), name="resnet18")


def _wide_basic_block(x, filters, stride, name, dtype):
    """Wide ResNet's pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut.
    When the block changes the shape, the shortcut is a 1x1 conv of relu(bn1(x)), else x."""
    out = _relu(_batch_norm(x, f"{name}_bn1", dtype), dtype)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv(out, filters, 1, stride, f"{name}_shortcut_conv", dtype)
    out = _conv(out, filters, 3, stride, f"{name}_conv1", dtype)
    out = _relu(_batch_norm(out, f"{name}_bn2", dtype), dtype)
    out = _conv(out, filters, 3, 1, f"{name}_conv2", dtype)
    return layers.Add(dtype=dtype)([out, shortcut])


def wide_resnet(depth, widen_factor, input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """WRN-``depth``-``widen_factor``: 3x3 stem conv (16 channels), three groups of
    (depth - 4) / 6 wide basic blocks with 16k, 32k, 64k channels (groups 2 and 3 start with
    stride 2), BN-ReLU, global average pool, linear."""
    input_shape = check_input_shape(input_shape)
    check_num_classes(num_classes)
    blocks_per_group = check_wide_resnet_arguments(depth, widen_factor)
    inputs = keras.Input(input_shape)
    x = _conv(inputs, 16, 3, 1, "conv1", dtype)
    for group, width in enumerate((16, 32, 64), start=1):
        for block in range(blocks_per_group):
            stride = 2 if group > 1 and block == 0 else 1
            x = _wide_basic_block(x, width * widen_factor, stride, f"layer{group}_{block}", dtype)
    x = _relu(_batch_norm(x, "bn", dtype), dtype)
    return keras.Model(inputs, _classifier(x, num_classes, dtype),
                       name=f"wrn_{depth}_{widen_factor}")


def build(name, input_shape=(32, 32, 3), num_classes=10, *, dtype=None):
    """The model ``name`` (one of ``sam_edu.models.MODELS``) as a functional ``keras.Model``
    taking NHWC input. ``dtype``: a Keras dtype policy for every layer (e.g.
    ``"mixed_bfloat16"``), None for the global policy."""
    check_name(name)
    if name == "small-cnn":
        return small_cnn(input_shape, num_classes, dtype=dtype)
    if name == "resnet18":
        return resnet18(input_shape, num_classes, dtype=dtype)
    return wide_resnet(*WIDE_RESNETS[name], input_shape, num_classes, dtype=dtype)


def count_params(model):
    """The number of trainable parameters of ``model`` (``model.count_params()`` would also count
    BatchNorm's moving statistics)."""
    return sum(math.prod(w.shape) for w in model.trainable_weights)
