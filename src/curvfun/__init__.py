"""curvfun: functional curvature for PyTorch on torch.func.

Pure functions over parameter pytrees (``dict(model.named_parameters())`` or a subset):

* per-sample gradients and their norms, Jacobians, J v and Jᵀ u;
* Fisher (exact / MC / empirical), GGN and Hessian of the mean loss: dense, block, diagonal,
  matrix-free products, Hutchinson estimators, top eigenvalues;
* Kronecker factors (K-FAC, K-FAC-reduce, EKFAC, unit-wise) from one captured pass;
* low-rank(+diagonal) K-FAC by power iteration, Sherman-Morrison / Woodbury inverses.

The stateful ASDL-compatible preconditioners live in :mod:`curvfun.precondition`; hypothesis
strategies and dense reference implementations in :mod:`curvfun.testing`.
"""

from . import lowrank, tree
from .capture import capture, SUPPORTED_LAYERS
from .curvature import (
    fisher,
    fisher_vp,
    ggn,
    ggn_vp,
    hessian,
    hessian_vp,
    hutchinson_diag,
    hutchinson_trace,
    top_eigenvalues,
)
from .grads import jacobian, jvp, per_sample_grad_norms, per_sample_grads, vjp
from .kron import (
    DiagFactor,
    EKFACFactor,
    EmbeddingFactor,
    KronEigen,
    KronFactor,
    KronInverse,
    NotPositiveDefiniteError,
    UnitWiseFactor,
)
from .kron_drivers import ekfac, kfac
from .losses import BCEWithLogits, CrossEntropy, Likelihood, MSE, get_likelihood
from .lowrank import (
    LowRankKron,
    lowrank as lowrank_factor,
    lowrank_plus_diag,
    power_iteration,
    sherman_morrison_solve,
    woodbury_solve,
)

__version__ = "0.1.0"

__all__ = [
    "tree",
    "lowrank",
    "power_iteration",
    "lowrank_factor",
    "lowrank_plus_diag",
    "sherman_morrison_solve",
    "woodbury_solve",
    "LowRankKron",
    "capture",
    "SUPPORTED_LAYERS",
    "per_sample_grads",
    "per_sample_grad_norms",
    "jacobian",
    "jvp",
    "vjp",
    "fisher",
    "ggn",
    "hessian",
    "fisher_vp",
    "ggn_vp",
    "hessian_vp",
    "hutchinson_diag",
    "hutchinson_trace",
    "top_eigenvalues",
    "kfac",
    "ekfac",
    "KronFactor",
    "KronInverse",
    "KronEigen",
    "EKFACFactor",
    "EmbeddingFactor",
    "UnitWiseFactor",
    "DiagFactor",
    "NotPositiveDefiniteError",
    "get_likelihood",
    "Likelihood",
    "CrossEntropy",
    "MSE",
    "BCEWithLogits",
]
