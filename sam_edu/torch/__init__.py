"""sam_edu for PyTorch: ``torch.optim.Optimizer`` classes that wrap a base optimizer.

``SAM`` (and ASAM with ``adaptive=True``) runs the two-pass step of ``sam_edu.reference``; ``GSAM``
and ``WSAM`` change the direction of the base step (surrogate gap, weighted sharpness);
``disable_running_stats`` keeps BatchNorm statistics from the second pass. Imports only torch.
"""

from sam_edu.torch.gsam import GSAM
from sam_edu.torch.sam import SAM, disable_running_stats
from sam_edu.torch.wsam import WSAM

__all__ = ["GSAM", "SAM", "WSAM", "disable_running_stats"]
