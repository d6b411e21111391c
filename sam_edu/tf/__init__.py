"""SAM, GSAM, WSAM, bSAM and LookSAM for TensorFlow / Keras 3: Keras optimizers, a ``model.fit``
train step (``sam_train_step``, built into ``SAMModel`` and ``SAMSequential``), the pure math.
A bare ``model.compile(optimizer=SAM(...))`` trains too, alternating ascent and descent over
consecutive batches (transparent mode).

``SAM`` (ASAM with ``adaptive=True``) wraps a base optimizer; ``GSAM``, ``WSAM`` and ``LookSAM``
are SAMs that change the base step's direction (LookSAM's ``first_step`` also says whether pass 2
is needed). ``BSAM`` is a full optimizer of its own (Bayesian SAM: a mean and a precision per
weight, pass 1 at a noisy point, ``posterior_sample`` for model averaging). ``AdversarialSAM`` is
``optax.contrib.sam``'s formulation: any outer and any adversarial (inner) Keras optimizer,
``sync_period`` gradients per outer step, transparent (``apply_gradients``, ``model.fit``) or
opaque (``step(grad_fn, variables)``).

Needs Keras 3 on the TensorFlow backend; ``KERAS_BACKEND`` defaults to ``tensorflow`` here.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError("sam_edu.tf needs Keras on the TensorFlow backend (KERAS_BACKEND="
                      f"tensorflow); Keras is running on {keras.backend.backend()!r}")

from sam_edu.tf.adversarial import AdversarialSAM, normalize  # noqa: E402
from sam_edu.tf.bsam import (  # noqa: E402
    BSAM,
    bsam_mean,
    bsam_momentum,
    bsam_perturbation,
    bsam_precision,
    check_bsam_arguments,
    posterior_sample,
)
from sam_edu.tf.gsam import GSAM, decompose, gsam_direction, gsam_perturbation  # noqa: E402
from sam_edu.tf.looksam import (  # noqa: E402
    LookSAM,
    check_looksam_arguments,
    is_sam_step,
    looksam_direction,
    orthogonal_component,
)
from sam_edu.tf.sam import (  # noqa: E402
    SAM,
    SAMModel,
    SAMSequential,
    SAMTrainStep,
    asam_perturbation,
    ascend,
    centralize_gradient,
    ema_update,
    global_norm,
    perturbation,
    perturbation_norm,
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
    "AdversarialSAM",
    "BSAM",
    "GSAM",
    "LookSAM",
    "SAM",
    "SAMModel",
    "SAMSequential",
    "SAMTrainStep",
    "WSAM",
    "asam_perturbation",
    "ascend",
    "bsam_mean",
    "bsam_momentum",
    "bsam_perturbation",
    "bsam_precision",
    "centralize_gradient",
    "check_bsam_arguments",
    "check_looksam_arguments",
    "clip_by_global_norm",
    "decompose",
    "ema_update",
    "global_norm",
    "gsam_direction",
    "gsam_perturbation",
    "is_sam_step",
    "looksam_direction",
    "normalize",
    "orthogonal_component",
    "perturbation",
    "perturbation_norm",
    "posterior_sample",
    "sam_perturbation",
    "sam_train_step",
    "scale_operator",
    "sharpness_weight",
    "wsam_direction",
]
