"""ASDL 0.1's remaining public names, mapped onto curvfun's makers and config.

* constants: ``LOSS_CROSS_ENTROPY``, ``LOSS_MSE``, ``FISHER_EXACT`` / ``FISHER_MC`` / ``FISHER_EMP``,
  ``SHAPE_FULL`` / ``SHAPE_LAYER_WISE`` / ``SHAPE_KRON`` / ``SHAPE_KFE`` / ``SHAPE_UNIT_WISE`` /
  ``SHAPE_DIAG`` (ASDL's string values);
* configs: :class:`NewtonGradientConfig`, :class:`CurveBallGradientConfig`,
  :class:`SmwEmpNaturalGradientConfig`: ASDL's constructors (positional order and defaults),
  built as :class:`PreconditioningConfig` subclasses so that every curvfun maker takes them;
* :class:`NaturalGradientMaker`: ASDL's dispatcher over ``fisher_shape``;
* :func:`get_update_schedule`: ASDL's list-of-bools refresh schedule.

Differences from ASDL 0.1, each also in the docstring concerned: ``NewtonGradientConfig`` carries the
shared schedule fields too (ASDL's has only ``damping`` and ``absolute``); a
``SmwEmpNaturalGradientConfig``'s ``data_size`` may differ from the batch size (ASDL's N x N kernel
is allocated from ``data_size`` and breaks otherwise); ``get_update_schedule`` builds a
``'linear'`` schedule for any number of updates (ASDL divides by zero for fewer than three and can
overrun ``num_total_steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import INTERVAL_CONSTANT, INTERVAL_STEP, INTERVAL_TYPES, PreconditioningConfig

__all__ = [
    "LOSS_CROSS_ENTROPY",
    "LOSS_MSE",
    "FISHER_EXACT",
    "FISHER_MC",
    "FISHER_EMP",
    "SHAPE_FULL",
    "SHAPE_LAYER_WISE",
    "SHAPE_KRON",
    "SHAPE_KFE",
    "SHAPE_UNIT_WISE",
    "SHAPE_DIAG",
    "NewtonGradientConfig",
    "CurveBallGradientConfig",
    "SmwEmpNaturalGradientConfig",
    "NaturalGradientMaker",
    "get_update_schedule",
]

LOSS_CROSS_ENTROPY = "cross_entropy"
LOSS_MSE = "mse"
FISHER_EXACT = "fisher_exact"
FISHER_MC = "fisher_mc"
FISHER_EMP = "fisher_emp"
#: ASDL's fisher_type names -> the capture's (curvfun's one vocabulary inside): mapped once, here
CAPTURE_FISHER_TYPE = {FISHER_EXACT: "exact", FISHER_MC: "mc", FISHER_EMP: "emp"}
SHAPE_FULL = "full"
SHAPE_LAYER_WISE = "layer_wise"
SHAPE_KRON = "kron"
SHAPE_KFE = "kfe"
SHAPE_UNIT_WISE = "unit_wise"
SHAPE_DIAG = "diag"


# --- configs ------------------------------------------------------------------------------------


@dataclass(init=False)
class NewtonGradientConfig(PreconditioningConfig):
    """ASDL's ``NewtonGradientConfig(damping=1e-8, absolute=False)`` for
    :class:`~curvfun.precondition.NewtonGradientMaker`: ``(H + λI)⁻¹ g``, or ``(|H| + λI)⁻¹ g``
    with ``absolute=True`` (the maker's ``abs_eigenvalues``).

    Any :class:`PreconditioningConfig` field may be given by keyword as well (schedules, EMA,
    ``ignore_modules``); ASDL's config has only these two, and ASDL refactors H on every step.
    """

    absolute: bool = False

    def __init__(self, damping: float = 1.0e-8, absolute: bool = False, **fields: Any) -> None:
        if not isinstance(absolute, bool):
            raise TypeError(f"NewtonGradientConfig.absolute must be a bool, got {absolute!r}")
        self.absolute = absolute
        super().__init__(damping=damping, **fields)


@dataclass
class CurveBallGradientConfig(PreconditioningConfig):
    """ASDL's ``CurveBallGradientConfig``: a :class:`PreconditioningConfig` with ``damping`` 1e-7.

    ``momentum`` (0.9) and ``momentum_decay`` (1.) are class attributes, not fields, as in ASDL;
    ASDL's maker never reads them and neither does curvfun's: pass them to
    :class:`~curvfun.precondition.CurveBallGradientMaker` (its ``momentum`` / ``momentum_decay``
    arguments, same defaults).
    """

    damping: float = 1.0e-7
    momentum = 0.9
    momentum_decay = 1.0


@dataclass(init=False)
class SmwEmpNaturalGradientConfig(PreconditioningConfig):
    """ASDL's ``SmwEmpNaturalGradientConfig(data_size, damping=1e-5)`` for
    :class:`~curvfun.precondition.SmwEmpNaturalGradientMaker` (``data_size`` is required, as in
    ASDL; other :class:`PreconditioningConfig` fields by keyword).

    Difference from ASDL 0.1: ASDL allocates its N x N kernel from ``data_size``, so a batch of
    another size (e.g. the last, smaller one) fails there; curvfun's maker uses the batch it gets
    (F_emp is the batch mean, GUIDE) and ``data_size`` is recorded only.
    """

    def __init__(self, data_size: int, damping: float = 1.0e-5, **fields: Any) -> None:
        super().__init__(data_size=data_size, damping=damping, **fields)


# --- NaturalGradientMaker -------------------------------------------------------------------------


def _maker_for(shape: str):
    from . import natural_gradient as ng

    return {
        SHAPE_FULL: ng.FullNaturalGradientMaker,
        SHAPE_LAYER_WISE: ng.LayerWiseNaturalGradientMaker,
        SHAPE_KRON: ng.KfacGradientMaker,
        SHAPE_KFE: ng.EkfacGradientMaker,
        SHAPE_UNIT_WISE: ng.UnitWiseNaturalGradientMaker,
        SHAPE_DIAG: ng.DiagNaturalGradientMaker,
    }.get(shape)


_SHAPES = (SHAPE_FULL, SHAPE_LAYER_WISE, SHAPE_KRON, SHAPE_KFE, SHAPE_UNIT_WISE, SHAPE_DIAG)


def _one_shape(fisher_shape: Any) -> str:
    """The single shape of ``fisher_shape`` (a str, or a list of equal str entries)."""
    entries = [fisher_shape] if isinstance(fisher_shape, str) else list(fisher_shape)
    if not entries or not all(isinstance(e, str) for e in entries) or len(set(entries)) != 1:
        raise NotImplementedError(
            f"NaturalGradientMaker: fisher_shape={fisher_shape!r}: per-module shape assignments (tuples, or "
            f"several shapes) are not supported; give one shape of {list(_SHAPES)} and leave other layers out "
            f"with config.ignore_modules"
        )
    if entries[0] not in _SHAPES:
        raise ValueError(f"NaturalGradientMaker: unknown fisher_shape {entries[0]!r}; expected one of {list(_SHAPES)}")
    return entries[0]


class _DispatchMeta(type):
    def __instancecheck__(cls, obj: Any) -> bool:
        if cls is not NaturalGradientMaker:
            return super().__instancecheck__(obj)
        return any(isinstance(obj, _maker_for(s)) for s in _SHAPES)


class NaturalGradientMaker(metaclass=_DispatchMeta):
    """ASDL's ``NaturalGradientMaker(model, config, fisher_type, fisher_shape, loss_type, scale,
    grad_scale, sync_group, sync_group_ranks, module_partitions, n_mc_samples, var, seed)``: builds
    the curvfun maker of the requested ``fisher_shape`` (ASDL's defaults ``fisher_mc``, ``full``,
    ``cross_entropy``)::

        full -> FullNaturalGradientMaker         layer_wise -> LayerWiseNaturalGradientMaker
        kron -> KfacGradientMaker                kfe        -> EkfacGradientMaker
        unit_wise -> UnitWiseNaturalGradientMaker   diag    -> DiagNaturalGradientMaker

    ``isinstance(m, NaturalGradientMaker)`` holds for all of them. ``seed`` seeds the maker's own
    generator (ASDL re-seeds the global RNG on every Fisher computation). Not supported, with an
    error naming the argument: ``scale``/``grad_scale`` other than 1 (scale the damping and the
    learning rate instead), ``var`` other than 1 (curvfun's makers take the likelihood by name),
    ASDL's distributed arguments (curvfun reads ``torch.distributed`` itself), and per-module
    shape assignments.
    """

    def __new__(
        cls,
        model: nn.Module,
        config: PreconditioningConfig | None = None,
        fisher_type: str = FISHER_MC,
        fisher_shape: Any = SHAPE_FULL,
        loss_type: str = LOSS_CROSS_ENTROPY,
        scale: float = 1,
        grad_scale: float = 1,
        sync_group: Any = None,
        sync_group_ranks: Any = None,
        module_partitions: Any = None,
        n_mc_samples: int = 1,
        var: float = 1.0,
        seed: int | None = None,
    ):
        for name, value in (("scale", scale), ("grad_scale", grad_scale), ("var", var)):
            if value != 1:
                raise NotImplementedError(
                    f"NaturalGradientMaker: {name}={value!r} is not supported (only 1); "
                    + ("use loss_type='mse' with unit variance and rescale the targets" if name == "var" else
                       "a scaled Fisher s·F is the same preconditioner with damping λ/s and learning rate lr/s")
                )
        for name, value in (("sync_group", sync_group), ("sync_group_ranks", sync_group_ranks),
                            ("module_partitions", module_partitions)):
            if value is not None:
                raise NotImplementedError(
                    f"NaturalGradientMaker: {name} is not supported; curvfun's makers average over "
                    f"torch.distributed's default group themselves (see curvfun.distributed)"
                )
        maker_cls = _maker_for(_one_shape(fisher_shape))
        return maker_cls(model, config, fisher_type, loss_type, n_mc_samples, seed=seed)


# --- get_update_schedule -------------------------------------------------------------------------


def get_update_schedule(
    num_total_steps: int,
    update_ratio: float = 1.0,
    warmup_ratio: float = 0.0,
    interval_type: str = INTERVAL_CONSTANT,
    reverse: bool = False,
) -> list[bool]:
    """ASDL's refresh schedule as a list of ``num_total_steps`` bools (True: refresh at that step).

    U = int(T·update_ratio) refreshes in all, the first W = int(T·warmup_ratio) steps all refresh;
    the remaining U − W refreshes over the S = T − W later steps are placed by ``interval_type``:

    * ``'constant'``: every floor(S / (U − W))-th step (at most U refreshes in all);
    * ``'step'``: on the U − W steps right after the warm-up;
    * ``'linear'``: gaps 1, 1 + d, 1 + 2d, ... between the n + 1 = U − W refreshes, d =
      floor(2(S − n) / (n(n − 1))) as in ASDL, lowered (to 0 at least) until the schedule fits in S
      steps. ASDL divides by zero for n < 2 and raises when its d overruns; here n = 0 gives one
      refresh and n = 1 two consecutive ones.

    ``reverse`` reverses the list. Errors name the argument, as ASDL's.
    """
    if isinstance(num_total_steps, bool) or not isinstance(num_total_steps, int) or num_total_steps <= 0:
        raise ValueError(f"num_total_steps has to be a positive int. Got {num_total_steps!r}.")
    if not 0 <= update_ratio <= 1:
        raise ValueError(f"update_ratio has to be in [0, 1]. Got {update_ratio}.")
    if not 0 <= warmup_ratio <= 1:
        raise ValueError(f"warmup_ratio has to be in [0, 1]. Got {warmup_ratio}.")
    T = num_total_steps
    U = int(T * update_ratio)
    W = int(T * warmup_ratio)
    if W > U:
        raise ValueError(f"num_warmup_steps cannot be larger than num_total_updates ({U}). Got {W}.")
    if interval_type not in INTERVAL_TYPES:
        raise ValueError(f"Invalid interval_type: {interval_type!r}. {INTERVAL_TYPES} are supported.")
    schedule = [True] * W
    S, R = T - W, U - W
    if R > 0:
        if interval_type == INTERVAL_CONSTANT:
            interval = S // R
            done = W
            for i in range(S):
                hit = i % interval == 0 and done < U
                done += hit
                schedule.append(hit)
        elif interval_type == INTERVAL_STEP:
            schedule.extend([True] * R)
        else:
            n = R - 1
            d = math.floor(2 * (S - n) / n / (n - 1)) if n >= 2 else 0
            while d > 0 and 1 + n + d * n * (n - 1) // 2 > S:
                d -= 1
            schedule.append(True)
            for i in range(n):
                schedule.extend([False] * (d * i) + [True])
    schedule.extend([False] * (T - len(schedule)))
    return schedule[::-1] if reverse else schedule
