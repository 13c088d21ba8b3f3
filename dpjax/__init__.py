"""dpjax: differentially private machine learning in JAX."""

from dpjax import accounting, audit, clipping, noise, sampling, secagg
from dpjax.clipping import clipped_grad
from dpjax.noise import privatize

__version__ = "0.1.0"

__all__ = [
    "accounting",
    "audit",
    "clipped_grad",
    "clipping",
    "noise",
    "privatize",
    "sampling",
    "secagg",
]
