"""sam_edu for PyTorch: ``torch.optim.Optimizer`` classes.

``SAM`` (and ASAM with ``adaptive=True``) runs the two-pass step of ``sam_edu.reference`` around
a base optimizer; ``GSAM`` and ``WSAM`` change the direction of the base step (surrogate gap,
weighted sharpness). ``BSAM`` is a full optimizer of its own (Bayesian SAM: a mean and a
precision per weight, pass 1 at a noisy point, ``posterior_sample()`` for model averaging).
``LookSAM`` takes SAM's second pass only every ``k``-th step and reuses the orthogonal part of its
gradient in between; its ``first_step()`` returns whether the loop must run that pass.
``AdversarialSAM`` is ``optax.contrib.sam``'s formulation: any outer and any adversarial (inner)
optimizer, ``sync_period`` gradients per outer step, transparent (``step()``) or opaque
(``step(closure)``). ``disable_running_stats`` keeps BatchNorm statistics from the second pass.
Imports only torch.
"""

from sam_edu.torch.adversarial import AdversarialSAM
from sam_edu.torch.bsam import BSAM
from sam_edu.torch.gsam import GSAM
from sam_edu.torch.looksam import LookSAM
from sam_edu.torch.sam import SAM, disable_running_stats
from sam_edu.torch.wsam import WSAM

__all__ = ["AdversarialSAM", "BSAM", "GSAM", "LookSAM", "SAM", "WSAM", "disable_running_stats"]
