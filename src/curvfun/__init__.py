"""curvfun: functional curvature for PyTorch on torch.func."""

from . import tree
from .losses import get_likelihood, Likelihood, CrossEntropy, MSE, BCEWithLogits

__version__ = "0.1.0"
