"""Optimizers that read curvature themselves (``torch.optim.Optimizer`` subclasses).

* :class:`AdaFisher` / :class:`AdaFisherW`: Adam-like steps preconditioned by the damped
  diagonal-Kronecker Fisher of each layer (hooks on the model; see :mod:`curvfun.optim.adafisher`);
* :class:`AdaHessian`: Adam with a Hutchinson Hessian diagonal (needs
  ``loss.backward(create_graph=True)``; see :mod:`curvfun.optim.adahessian`).

The preconditioners that rewrite gradients for any optimizer live in :mod:`curvfun.precondition`.
"""

from .adafisher import FALLBACKS, AdaFisher, AdaFisherW
from .adahessian import AdaHessian

__all__ = ["AdaFisher", "AdaFisherW", "AdaHessian", "FALLBACKS"]
