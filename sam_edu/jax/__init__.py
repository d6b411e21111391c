"""JAX/optax: SAM and its variants as optax ``GradientTransformation``s, plus their pure functions.

Parameters, gradients and perturbations are pytrees; every norm is the **global** L2 norm over all
leaves (``../shared/SPEC.md``). The pure functions carry the names of ``sam_edu.reference``.
"""

from sam_edu.jax.gsam import (
    GSAMState,
    decompose,
    gsam,
    gsam_direction,
    gsam_perturbation,
    lr_proportional_rho,
)
from sam_edu.jax.sam import (
    SAMState,
    asam_perturbation,
    ascend,
    global_norm,
    perturbation,
    sam,
    sam_perturbation,
    scale_operator,
)
from sam_edu.jax.wsam import (
    WSAMState,
    clip_by_global_norm,
    sharpness_step,
    sharpness_weight,
    wsam,
    wsam_direction,
)

__all__ = [
    "GSAMState",
    "SAMState",
    "WSAMState",
    "asam_perturbation",
    "ascend",
    "clip_by_global_norm",
    "decompose",
    "global_norm",
    "gsam",
    "gsam_direction",
    "gsam_perturbation",
    "lr_proportional_rho",
    "perturbation",
    "sam",
    "sam_perturbation",
    "scale_operator",
    "sharpness_step",
    "sharpness_weight",
    "wsam",
    "wsam_direction",
]
