"""The image classifiers of the training command, written once per framework.

``sam_edu.models.torch``, ``sam_edu.models.jax`` (flax.linen) and ``sam_edu.models.tf`` (Keras 3,
functional API) each define the same four models, with the same names, layers, parameter counts
and initialisation, and the same two functions::

    build(name, input_shape=(32, 32, 3), num_classes=10, *, dtype=None) -> model
    count_params(model_or_params) -> int      # trainable parameters

``input_shape`` is always ``(H, W, C)``. PyTorch models take NCHW tensors; flax and Keras models
take NHWC arrays. This module imports no framework: only the names and the argument checks
shared by the three live here.

The models (``MODELS``):

* ``"small-cnn"`` -- conv3x3(32)-BN-ReLU, conv3x3(64)-BN-ReLU, 2x2 max-pool, conv3x3(128)-BN-ReLU,
  global average pool, linear. About 0.1 M parameters: fast on a CPU, for 8x8 digits as for
  32x32 images (global average pooling makes it work for any image of at least 2x2 pixels).
* ``"resnet18"`` -- ResNet-18 (He et al., "Deep Residual Learning for Image Recognition",
  CVPR 2016) in its CIFAR form: a 3x3 stride-1 stem conv and no max-pool, then four stages of
  two basic blocks (conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU) with 64, 128, 256
  and 512 channels; stages 2-4 halve the resolution in their first conv, and a block whose shape
  changes has a 1x1 conv + BN shortcut. Global average pool, linear. 11,173,962 parameters at
  10 classes.
* ``"wrn-16-8"``, ``"wrn-28-10"`` -- Wide ResNets WRN-depth-k (Zagoruyko & Komodakis, "Wide
  Residual Networks", BMVC 2016): a 3x3 stem conv with 16 channels, then three groups of
  ``(depth - 4) / 6`` pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the
  shortcut) with 16k, 32k and 64k channels; groups 2 and 3 halve the resolution. A block whose
  shape changes takes a 1x1 conv shortcut from its pre-activated input. Final BN-ReLU, global
  average pool, linear. No dropout (rate 0). WRN-16-8: 10,961,370 parameters, WRN-28-10:
  36,479,194 (10 classes). ``wide_resnet(depth, widen_factor, ...)`` builds any other WRN.

Shared conventions, so that the three versions compute the same function:

* every conv that BatchNorm follows has no bias (all convs here);
* BatchNorm: eps 1e-5, momentum 0.9 in Keras and flax, the same update as PyTorch's momentum 0.1
  (``running = 0.9 * running + 0.1 * batch``). One difference remains: PyTorch's running
  variance uses the unbiased batch variance (divides by n - 1), Keras and flax the biased one;
  the normalisation itself (train and eval) is the same everywhere;
* padding: a 3x3 conv pads one pixel on every side (PyTorch's ``padding=1``), also at stride 2,
  where Keras' and flax's ``"SAME"`` would pad only on the bottom/right of an even-sized input;
  a stride-2 1x1 conv reads pixels 0, 2, 4, ... So output shapes *and* outputs agree;
* initialisation: convs He/Kaiming normal with ``fan_out`` (std = sqrt(2 / (out_channels * 3 *
  3)), the torchvision choice), BatchNorm gamma = 1 and beta = 0. The final linear layer keeps
  its framework's default (PyTorch: uniform +-1/sqrt(fan_in) for weight and bias; flax: LeCun
  normal weight, zero bias; Keras: Glorot uniform weight, zero bias).
"""

import numbers

MODELS = ("small-cnn", "resnet18", "wrn-16-8", "wrn-28-10")

# depth and widen factor of the named Wide ResNets
WIDE_RESNETS = {"wrn-16-8": (16, 8), "wrn-28-10": (28, 10)}

__all__ = ["MODELS", "WIDE_RESNETS", "check_input_shape", "check_name", "check_num_classes",
           "check_wide_resnet_arguments"]


def check_name(name):
    """Raise ``ValueError`` listing ``MODELS`` unless ``name`` is one of them."""
    if name not in MODELS:
        raise ValueError(f"name must be one of {', '.join(map(repr, MODELS))}; got {name!r}")


def check_input_shape(input_shape, min_size=1):
    """Return ``input_shape`` as a tuple of three ints ``(H, W, C)``, all positive and
    ``H, W >= min_size``; else raise ``ValueError`` naming ``input_shape``."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else ()
    if len(shape) != 3 or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape):
        raise ValueError(f"input_shape must be three positive ints (H, W, C); got {input_shape!r}")
    if min(shape[:2]) < min_size:
        raise ValueError(f"input_shape must have H, W >= {min_size} for this model; got "
                         f"{input_shape!r}")
    return tuple(int(d) for d in shape)


def check_num_classes(num_classes):
    """Raise ``ValueError`` unless ``num_classes`` is an int >= 2."""
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) \
            or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")


def check_wide_resnet_arguments(depth, widen_factor):
    """Validate a Wide ResNet's ``depth`` (``6 n + 4``, n >= 1) and ``widen_factor`` (int >= 1);
    return ``n``, the number of blocks per group."""
    if not isinstance(depth, numbers.Integral) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth must be 6 n + 4 with n >= 1 (10, 16, 22, 28, ...); got {depth!r}")
    if not isinstance(widen_factor, numbers.Integral) or widen_factor < 1:
        raise ValueError(f"widen_factor must be an int >= 1; got {widen_factor!r}")
    return (depth - 4) // 6
