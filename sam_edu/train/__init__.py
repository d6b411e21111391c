"""The training command: ``python -m sam_edu.train`` and its Python form :func:`train`.

One command trains any model of :mod:`sam_edu.models` on any dataset of :mod:`sam_edu.data`
with SGD or any SAM variant, in PyTorch, JAX or TensorFlow, on a CPU or a GPU::

    python -m sam_edu.train --framework torch --optimizer sam --model wrn-28-10 \\
        --dataset cifar10 --epochs 200 --batch-size 128 --lr 0.1 --rho 0.05

:mod:`sam_edu.train.common` holds what the frameworks share (the configuration and its checks,
the batches, the cosine schedule, the log, resuming); each backend holds one framework's steps.
Importing this package imports no framework.
"""

from sam_edu.train.common import Config, cosine_lr, resolve, train

__all__ = ["Config", "cosine_lr", "resolve", "train"]
