"""sam_edu for PyTorch: ``torch.optim.Optimizer`` classes that wrap a base optimizer.

``SAM`` (and ASAM with ``adaptive=True``) runs the two-pass step of ``sam_edu.reference``;
``disable_running_stats`` keeps BatchNorm statistics from the second pass. Imports only torch.
"""

from sam_edu.torch.sam import SAM, disable_running_stats

__all__ = ["SAM", "disable_running_stats"]
