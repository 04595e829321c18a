"""ASDL-compatible gradient preconditioning: ``GradientMaker``, ``PreconditioningConfig`` and the
``PreconditionedGradientMaker`` base the makers build on.

An ASDL training loop runs unchanged but for its import line::

    from curvfun.precondition import PreconditioningConfig, GradientMaker

The schedule rules, and where curvfun differs from ASDL 0.1, are documented in
:mod:`curvfun.precondition.config` and :mod:`curvfun.precondition.base`.
"""

from .config import (
    INTERVAL_CONSTANT,
    INTERVAL_LINEAR,
    INTERVAL_STEP,
    INTERVAL_TYPES,
    NO_DATA_SIZE,
    NO_EMA,
    SCHEDULE_KINDS,
    PreconditioningConfig,
    Schedule,
    interval_at,
    is_update_step,
    resolve_schedule,
    update_steps,
)
from .dummy import DummyObject, DummyReplayError, replace_dummies, replay
from .base import (
    GradientMaker,
    ModuleAssignment,
    NonFiniteCurvatureWarning,
    PreconditionedGradientMaker,
    UnsupportedModuleWarning,
    all_finite,
    assign_modules,
    unwrap_model,
)

__all__ = [
    # interface
    "GradientMaker",
    "PreconditioningConfig",
    "PreconditionedGradientMaker",
    "DummyObject",
    "DummyReplayError",
    "replay",
    "replace_dummies",
    # schedules (pure)
    "INTERVAL_CONSTANT",
    "INTERVAL_STEP",
    "INTERVAL_LINEAR",
    "INTERVAL_TYPES",
    "SCHEDULE_KINDS",
    "NO_EMA",
    "NO_DATA_SIZE",
    "Schedule",
    "resolve_schedule",
    "interval_at",
    "is_update_step",
    "update_steps",
    # helpers for makers
    "ModuleAssignment",
    "assign_modules",
    "unwrap_model",
    "all_finite",
    "NonFiniteCurvatureWarning",
    "UnsupportedModuleWarning",
]

# --- makers -------------------------------------------------------------------------------------
from .natural_gradient import *  # noqa: F401,F403,E402
from .natural_gradient import __all__ as _ng_all  # noqa: E402

__all__ += list(_ng_all)
# The natural-gradient family (KfacGradientMaker, EkfacGradientMaker, DiagNaturalGradientMaker,
# UnitWiseNaturalGradientMaker, LayerWiseNaturalGradientMaker, FullNaturalGradientMaker,
# EmpNaturalGradientMaker, LowRankKfacGradientMaker) is added here, once natural_gradient.py
# exists, with a plain import and its names appended to __all__:
#
#     from .natural_gradient import *  # noqa: F401,F403
#     from .natural_gradient import __all__ as _ng_all
#     __all__ += list(_ng_all)
from .newton import NewtonGradientMaker  # noqa: E402
from .curveball import CurveBallGradientMaker  # noqa: E402

__all__ += ["NewtonGradientMaker", "CurveBallGradientMaker"]
from .shampoo import ShampooGradientMaker  # noqa: E402
from .psgd import KronPsgdGradientMaker, PsgdGradientMaker  # noqa: E402
from .kbfgs import KronBfgsGradientMaker  # noqa: E402
from .seng import SengGradientMaker  # noqa: E402
from .smw import SmwEmpNaturalGradientMaker  # noqa: E402

__all__ += ["ShampooGradientMaker", "KronPsgdGradientMaker", "PsgdGradientMaker", "KronBfgsGradientMaker", "SengGradientMaker",
            "SmwEmpNaturalGradientMaker"]
from .asdl_names import *  # noqa: F401,F403,E402
from .asdl_names import __all__ as _asdl_all  # noqa: E402

__all__ += list(_asdl_all)
