"""SAM, GSAM and WSAM for TensorFlow / Keras 3: Keras optimizers, a ``model.fit`` train step,
the pure math.

Needs Keras 3 on the TensorFlow backend; ``KERAS_BACKEND`` defaults to ``tensorflow`` here.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError("sam_edu.tf needs Keras on the TensorFlow backend (KERAS_BACKEND="
                      f"tensorflow); Keras is running on {keras.backend.backend()!r}")

from sam_edu.tf.gsam import GSAM, decompose, gsam_direction, gsam_perturbation  # noqa: E402
from sam_edu.tf.sam import (  # noqa: E402
    SAM,
    asam_perturbation,
    ascend,
    centralize_gradient,
    global_norm,
    perturbation,
    sam_perturbation,
    sam_train_step,
    scale_operator,
)
from sam_edu.tf.wsam import (  # noqa: E402
    WSAM,
    clip_by_global_norm,
    sharpness_weight,
    wsam_direction,
)

__all__ = [
    "GSAM",
    "SAM",
    "WSAM",
    "asam_perturbation",
    "ascend",
    "centralize_gradient",
    "clip_by_global_norm",
    "decompose",
    "global_norm",
    "gsam_direction",
    "gsam_perturbation",
    "perturbation",
    "sam_perturbation",
    "sam_train_step",
    "scale_operator",
    "sharpness_weight",
    "wsam_direction",
]
