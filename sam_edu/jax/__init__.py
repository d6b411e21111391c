"""JAX/optax: SAM and its variants as optax ``GradientTransformation``s, plus their pure functions.

Parameters, gradients and perturbations are pytrees; every norm is the **global** L2 norm over all
leaves (``../shared/SPEC.md``). The pure functions carry the names of ``sam_edu.reference``.
"""

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

__all__ = [
    "SAMState",
    "asam_perturbation",
    "ascend",
    "global_norm",
    "perturbation",
    "sam",
    "sam_perturbation",
    "scale_operator",
]
