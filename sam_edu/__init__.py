"""sam_edu: Sharpness-Aware Minimization and its variants, written to be read.

Every algorithm exists four times, with the same names, defaults and numbered steps:

* :mod:`sam_edu.reference` -- NumPy, float64: the math, and the oracle for every test;
* :mod:`sam_edu.torch` -- ``torch.optim.Optimizer`` classes;
* :mod:`sam_edu.jax` -- optax gradient transformations;
* :mod:`sam_edu.tf` -- Keras 3 optimizers and train steps on the TensorFlow backend.

``import sam_edu`` imports no framework: each framework is an optional extra
(``pip install "sam_edu[torch]"``, ``[jax]``, ``[tf]``) and is imported only by its own subpackage.
"""

from sam_edu.profiles import pick, profile

__version__ = "0.1.0"
__all__ = ["pick", "profile", "__version__"]
