"""The NumPy reference: the math of every algorithm, in float64, one pure function per equation.

Parameters, gradients and perturbations are *lists of arrays* (one array per parameter tensor);
every norm is the **global** L2 norm over all of them as one vector (``../shared/SPEC.md``).
These functions are the oracle that every framework implementation is tested against.
"""

from sam_edu.reference.base import sgd_init, sgd_update
from sam_edu.reference.bsam import (
    bsam_init,
    bsam_mean,
    bsam_momentum,
    bsam_perturbation,
    bsam_precision,
    bsam_step,
    check_bsam_arguments,
    posterior_sample,
)
from sam_edu.reference.gsam import (
    decompose,
    gsam_direction,
    gsam_perturbation,
    gsam_step,
    lr_proportional_rho,
)
from sam_edu.reference.looksam import (
    check_looksam_arguments,
    is_sam_step,
    looksam_direction,
    looksam_step,
    orthogonal_component,
)
from sam_edu.reference.problems import (
    mlp_init,
    mlp_loss,
    mlp_loss_and_grad,
    two_basin_grad,
    two_basin_hessian,
    two_basin_loss,
)
from sam_edu.reference.sam import (
    ascend,
    asam_perturbation,
    centralize_gradient,
    global_norm,
    perturbation,
    sam_perturbation,
    sam_step,
    scale_operator,
)
from sam_edu.reference.wsam import (
    clip_by_global_norm,
    sharpness_weight,
    wsam_direction,
    wsam_step,
)

__all__ = [
    "asam_perturbation",
    "ascend",
    "bsam_init",
    "bsam_mean",
    "bsam_momentum",
    "bsam_perturbation",
    "bsam_precision",
    "bsam_step",
    "centralize_gradient",
    "check_bsam_arguments",
    "check_looksam_arguments",
    "clip_by_global_norm",
    "decompose",
    "global_norm",
    "gsam_direction",
    "gsam_perturbation",
    "gsam_step",
    "is_sam_step",
    "looksam_direction",
    "looksam_step",
    "lr_proportional_rho",
    "mlp_init",
    "mlp_loss",
    "mlp_loss_and_grad",
    "orthogonal_component",
    "perturbation",
    "posterior_sample",
    "sam_perturbation",
    "sam_step",
    "scale_operator",
    "sgd_init",
    "sgd_update",
    "sharpness_weight",
    "two_basin_grad",
    "two_basin_hessian",
    "two_basin_loss",
    "wsam_direction",
    "wsam_step",
]
