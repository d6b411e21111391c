"""JAX/optax: SAM and its variants as optax ``GradientTransformation``s, plus their pure functions.

Parameters, gradients and perturbations are pytrees; every norm is the **global** L2 norm over all
leaves (``../shared/SPEC.md``). The pure functions carry the names of ``sam_edu.reference``.
"""

from sam_edu.jax.adversarial import AdversarialSAMState, adversarial_sam, normalize
from sam_edu.jax.bsam import (
    BSAMState,
    bsam,
    bsam_mean,
    bsam_momentum,
    bsam_perturbation,
    bsam_precision,
    posterior_sample,
    sample_posterior,
)
from sam_edu.jax.gsam import (
    GSAMState,
    decompose,
    gsam,
    gsam_direction,
    gsam_perturbation,
    lr_proportional_rho,
)
from sam_edu.jax.looksam import (
    LookSAMState,
    is_sam_step,
    looksam,
    looksam_direction,
    orthogonal_component,
    projection_coefficient,
)
from sam_edu.jax.sam import (
    SAMState,
    asam_perturbation,
    ascend,
    global_norm,
    keep_finite,
    perturbation,
    perturbation_norm,
    sam,
    sam_perturbation,
    scale_operator,
    skip_unless_finite,
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
    "AdversarialSAMState",
    "BSAMState",
    "GSAMState",
    "LookSAMState",
    "SAMState",
    "WSAMState",
    "adversarial_sam",
    "asam_perturbation",
    "ascend",
    "bsam",
    "bsam_mean",
    "bsam_momentum",
    "bsam_perturbation",
    "bsam_precision",
    "clip_by_global_norm",
    "decompose",
    "global_norm",
    "gsam",
    "gsam_direction",
    "gsam_perturbation",
    "is_sam_step",
    "keep_finite",
    "looksam",
    "looksam_direction",
    "lr_proportional_rho",
    "normalize",
    "orthogonal_component",
    "perturbation",
    "perturbation_norm",
    "posterior_sample",
    "projection_coefficient",
    "sam",
    "sam_perturbation",
    "sample_posterior",
    "scale_operator",
    "sharpness_step",
    "sharpness_weight",
    "skip_unless_finite",
    "wsam",
    "wsam_direction",
]
