"""``PreconditioningConfig`` and the refresh schedules, as pure functions.

The config carries ASDL 0.1's fields with ASDL's defaults (``asdl.precondition.PreconditioningConfig``)
plus a few curvfun fields appended at the end. It is validated when it is built (and again when a
maker receives it, since a dataclass can be edited afterwards); every error says what to change.

Refresh schedules
-----------------
Two things are refreshed on a schedule: the *curvature* (a forward/backward pass that captures
curvature, then accumulation) and the *preconditioner* (inverting the accumulated curvature). Each
``kind`` in ``("preconditioner", "curvature")`` has its own fields, ``{kind}_upd_interval``,
``{kind}_warmup_steps``, ``{kind}_upd_ratio``, ``{kind}_warmup_ratio``, ``{kind}_interval_type``, plus
curvfun's ``{kind}_interval_milestones``, ``{kind}_interval_factor`` and ``{kind}_final_interval``.
Steps are counted from 0 (the first call of ``forward_and_backward()`` is step 0).

The whole rule, for one kind:

1. **Which parameters.** *Interval mode* (the default): the warm-up is ``W = {kind}_warmup_steps``
   and the start interval is ``I0 = {kind}_upd_interval``. *Ratio mode* is used when
   ``num_total_steps = T`` is set **and** a ratio field of that kind differs from its default
   (``preconditioner_upd_ratio != 1``, ``preconditioner_warmup_ratio != 0``; for the curvature,
   ``curvature_upd_ratio`` is not None); then, as ASDL does, ``U = int(T * {kind}_upd_ratio)``
   updates are made in all (warm-up included), ``W = int(T * {kind}_warmup_ratio)`` and
   ``I0 = floor((T - W) / (U - W))`` (no update after the warm-up when ``U == W``).
2. **Warm-up.** Every step ``s < W`` is a refresh step.
3. **After the warm-up** the refresh steps are ``p_0 = W`` and ``p_{j+1} = p_j + interval_at(p_j)``:
   the gap after a refresh is the interval in force at that refresh, where ``interval_at(s)`` is

   * ``'constant'``: ``I0``.
   * ``'step'``: ``max(1, round(I0 * factor**k))`` with ``k`` the number of
     ``{kind}_interval_milestones`` that are ``<= s`` (milestones are absolute step numbers, as in
     ``torch.optim.lr_scheduler.MultiStepLR``; ``factor = {kind}_interval_factor``, default 2, so the
     interval doubles at each milestone).
   * ``'linear'``: ``max(1, round(I0 + (I_end - I0) * min(1, (s - W) / (T - W))))``: the interval
     grows (or shrinks) linearly from ``I0`` at the end of the warm-up to ``I_end =
     {kind}_final_interval`` at step ``T = num_total_steps``, and stays ``I_end`` afterwards.

   ``round`` is Python's (to the nearest integer, ties to even).
4. **Ratio mode only**: at most ``U`` refreshes in all (later ones are dropped, as in ASDL) and
   none at a step ``>= T`` (ASDL warns and stops refreshing there; so do curvfun's makers).
5. **Curvature following the preconditioner.** When ``curvature_upd_interval`` and
   ``curvature_upd_ratio`` are both None (the default) the curvature is refreshed on exactly the
   preconditioner's refresh steps (as in ASDL); the other ``curvature_*`` schedule fields must
   then be left at their defaults (a config that sets them is rejected, since they would have no
   effect).

Differences from ASDL 0.1 (all deliberate; ASDL's behaviour is described in the GUIDE):

* ``'step'`` and ``'linear'`` are applied. ASDL declares them (and ``get_update_schedule`` has an
  ``interval_type`` argument) but never passes the configured type, so both behave as
  ``'constant'``; in the GitHub version ``preconditioner_interval_type`` is not even a dataclass
  field. ``curvature_interval_type`` is a real dataclass field here (it is a class attribute in
  ASDL, so ``PreconditioningConfig(curvature_interval_type=...)`` raises there).
* When ``curvature_upd_ratio`` is None, ASDL's curvature schedule is the one built from the
  preconditioner's interval or ratios, and ``curvature_warmup_steps`` / ``curvature_warmup_ratio`` /
  ``curvature_interval_type`` are silently ignored. curvfun gives the curvature its own schedule as
  soon as ``curvature_upd_interval`` or ``curvature_upd_ratio`` is set, and rejects the other
  ``curvature_*`` fields while the curvature follows the preconditioner.
* ASDL switches the preconditioner to ratio mode whenever ``num_total_steps`` is set, ignoring
  (with a warning) an explicit ``preconditioner_upd_interval``, so that ``num_total_steps=1000,
  preconditioner_upd_interval=10`` refreshes on *every* step. curvfun uses ratio mode only when a
  ratio is actually set, and rejects a config that sets both an interval and a ratio of one kind.
* Settings ASDL silently ignores are rejected: a ratio without ``num_total_steps``, ``*_warmup_steps``
  together with a ratio schedule, ``curvature_*`` schedule fields while the curvature follows the
  preconditioner, ``ignore_modules="conv"`` (a string, which ASDL iterates character by character).
* ASDL's ``'linear'`` construction divides by zero for fewer than three updates and can overrun
  ``num_total_steps``; the rule above has neither problem.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from torch import nn

__all__ = [
    "PreconditioningConfig",
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
]

INTERVAL_CONSTANT = "constant"
INTERVAL_STEP = "step"
INTERVAL_LINEAR = "linear"
INTERVAL_TYPES = (INTERVAL_CONSTANT, INTERVAL_STEP, INTERVAL_LINEAR)
SCHEDULE_KINDS = ("preconditioner", "curvature")

#: ASDL's sentinel for "no exponential moving average" (``ema_decay=-1``): the new curvature
#: replaces the old one on every curvature refresh.
NO_EMA = -1
#: ASDL's sentinel for "data size not given" (``data_size=-1``): makers use the batch size.
NO_DATA_SIZE = -1


@dataclass
class PreconditioningConfig:
    """Configuration of gradient preconditioning, field-compatible with ASDL 0.1.

    ASDL's fields, in ASDL's order and with ASDL's defaults:

    Args:
        num_total_steps: total number of training steps ``T``; needed by ratio schedules and by the
            ``'linear'`` interval type. (default: None)
        preconditioner_upd_interval: steps between preconditioner refreshes, ``>= 1``. (default: 1)
        preconditioner_warmup_steps: the first steps, all of which refresh. (default: 0)
        preconditioner_upd_ratio: fraction of the ``T`` steps that refresh (ratio mode). (default: 1.)
        preconditioner_warmup_ratio: fraction of ``T`` that is warm-up (ratio mode). (default: 0.)
        preconditioner_interval_type: ``'constant'``, ``'step'`` or ``'linear'``. (default: 'constant')
        curvature_upd_interval: steps between curvature refreshes; None: follow the
            preconditioner's schedule. (default: None)
        curvature_warmup_steps: as for the preconditioner. (default: 0)
        curvature_upd_ratio: as for the preconditioner; None: not in ratio mode. (default: None)
        curvature_warmup_ratio: as for the preconditioner. (default: 0.)
        curvature_interval_type: as for the preconditioner; a dataclass field here (a class
            attribute, not settable, in ASDL). (default: 'constant')
        data_size: number of samples the curvature is averaged over; ``-1`` (``NO_DATA_SIZE``): the
            batch size. ``None`` is accepted and stored as ``-1``. (default: -1)
        damping: Tikhonov damping ``lambda >= 0`` added before inverting. (default: 1e-7)
        ema_decay: weight of the new curvature in the moving average
            ``F <- (1 - ema_decay) * F + ema_decay * F_new``, in ``(0, 1]``; ``-1`` (``NO_EMA``, ASDL's
            sentinel) means no averaging: the new curvature replaces the old one. ``None`` is
            accepted and stored as ``-1``. (default: -1)
        ignore_modules: a list of modules (instances), module classes (e.g. ``nn.Linear``) or name
            substrings (e.g. ``"conv1"``, ``"block2."``); matching modules keep the plain gradient.
            Unlike ASDL, ignoring a container instance or class ignores every layer inside it (ASDL
            only compares leaf modules). A substring matches anywhere in the dotted name, so
            ``"conv1"`` also matches ``"conv10"`` (as in ASDL); end it with ``"."`` or use the
            instance to be exact. (default: None)

    curvfun additions (appended; ASDL has no such fields):

    Args:
        preconditioner_interval_milestones: steps at which a ``'step'`` interval is multiplied by
            ``preconditioner_interval_factor``; strictly increasing, ``>= 1``. (default: ())
        preconditioner_interval_factor: the multiplier of ``'step'``, ``> 0``. (default: 2.)
        preconditioner_final_interval: the interval a ``'linear'`` schedule reaches at
            ``num_total_steps``. (default: None)
        curvature_interval_milestones, curvature_interval_factor, curvature_final_interval: the same
            for the curvature. (defaults: (), 2., None)
        seed: seed of the maker's ``torch.Generator`` for MC sampling (a maker's ``seed=`` argument
            takes precedence). None: derived from ``torch.initial_seed()``. (default: None)

    The schedules these fields define are documented in this module's docstring and computed by
    :func:`interval_at`, :func:`is_update_step` and :func:`update_steps`.
    """

    num_total_steps: int | None = None
    preconditioner_upd_interval: int = 1
    preconditioner_warmup_steps: int = 0
    preconditioner_upd_ratio: float = 1.0
    preconditioner_warmup_ratio: float = 0.0
    preconditioner_interval_type: str = INTERVAL_CONSTANT
    curvature_upd_interval: int | None = None
    curvature_warmup_steps: int = 0
    curvature_upd_ratio: float | None = None
    curvature_warmup_ratio: float = 0.0
    curvature_interval_type: str = INTERVAL_CONSTANT
    data_size: int = NO_DATA_SIZE
    damping: float = 1.0e-7
    ema_decay: float = NO_EMA
    ignore_modules: list[Any] | None = None
    # --- curvfun additions ---
    preconditioner_interval_milestones: tuple[int, ...] = ()
    preconditioner_interval_factor: float = 2.0
    preconditioner_final_interval: int | None = None
    curvature_interval_milestones: tuple[int, ...] = ()
    curvature_interval_factor: float = 2.0
    curvature_final_interval: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.data_size is None:
            self.data_size = NO_DATA_SIZE
        if self.ema_decay is None:
            self.ema_decay = NO_EMA
        for kind in SCHEDULE_KINDS:
            name = f"{kind}_interval_milestones"
            value = getattr(self, name)
            if isinstance(value, (list, range)):
                setattr(self, name, tuple(value))
        self.validate()

    @property
    def use_ema(self) -> bool:
        """Whether curvature is averaged (``ema_decay != -1``)."""
        return self.ema_decay != NO_EMA

    def validate(self) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the field and what to change."""
        _validate(self)

    def summary(self) -> dict[str, Any]:
        """The fields as plain Python values (``ignore_modules`` entries as strings), e.g. for logs
        and state dicts: safe for ``torch.load(weights_only=True)``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "ignore_modules" and value is not None:
                value = [_describe_ignore_entry(v) for v in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _describe_ignore_entry(entry: Any) -> str:
    if isinstance(entry, str):
        return f"name containing {entry!r}"
    if isinstance(entry, type):
        return f"class {entry.__module__}.{entry.__qualname__}"
    return f"instance {type(entry).__name__}"


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _need_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value):
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be an int{none}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _need_fraction(name: str, value: Any) -> None:
    if not _is_real(value) or not math.isfinite(value):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (a fraction of num_total_steps), got {value}")


def _ratio_mode(config: PreconditioningConfig, kind: str) -> bool:
    if config.num_total_steps is None:
        return False
    if kind == "preconditioner":
        return config.preconditioner_upd_ratio != 1.0 or config.preconditioner_warmup_ratio != 0.0
    return config.curvature_upd_ratio is not None


def _follows_preconditioner(config: PreconditioningConfig) -> bool:
    return config.curvature_upd_interval is None and config.curvature_upd_ratio is None


def _validate(c: PreconditioningConfig) -> None:
    _need_int("num_total_steps", c.num_total_steps, 1, allow_none=True)

    # --- data_size, damping, ema_decay, seed, ignore_modules
    if not _is_int(c.data_size) or (c.data_size != NO_DATA_SIZE and c.data_size < 1):
        raise ValueError(
            f"data_size must be a positive int (the number of samples curvature is averaged over) "
            f"or -1 for 'the batch size', got {c.data_size!r}"
        )
    if not _is_real(c.damping) or not math.isfinite(c.damping):
        raise TypeError(f"damping must be a finite number >= 0, got {c.damping!r}")
    if c.damping < 0:
        raise ValueError(
            f"damping must be >= 0 (it is added to the curvature before inverting), got {c.damping}; "
            f"use a small positive value such as 1e-3"
        )
    if not _is_real(c.ema_decay) or not (c.ema_decay == NO_EMA or 0.0 < c.ema_decay <= 1.0):
        raise ValueError(
            f"ema_decay must be in (0, 1] (the weight of the new curvature in "
            f"F <- (1 - ema_decay) * F + ema_decay * F_new), or -1 for no moving average; "
            f"got {c.ema_decay!r}"
        )
    if c.seed is not None and not _is_int(c.seed):
        raise TypeError(f"seed must be an int or None, got {c.seed!r}")
    _validate_ignore_modules(c.ignore_modules)

    # --- schedules
    T = c.num_total_steps
    for kind in SCHEDULE_KINDS:
        itype = getattr(c, f"{kind}_interval_type")
        if itype not in INTERVAL_TYPES:
            raise ValueError(
                f"{kind}_interval_type must be one of {INTERVAL_TYPES}, got {itype!r}"
            )
        interval = getattr(c, f"{kind}_upd_interval")
        _need_int(f"{kind}_upd_interval", interval, 1, allow_none=(kind == "curvature"))
        _need_int(f"{kind}_warmup_steps", getattr(c, f"{kind}_warmup_steps"), 0)
        ratio = getattr(c, f"{kind}_upd_ratio")
        if not (kind == "curvature" and ratio is None):
            _need_fraction(f"{kind}_upd_ratio", ratio)
        _need_fraction(f"{kind}_warmup_ratio", getattr(c, f"{kind}_warmup_ratio"))
        milestones = getattr(c, f"{kind}_interval_milestones")
        factor = getattr(c, f"{kind}_interval_factor")
        final = getattr(c, f"{kind}_final_interval")
        if not isinstance(milestones, tuple) or not all(_is_int(m) for m in milestones):
            raise TypeError(f"{kind}_interval_milestones must be a tuple of ints, got {milestones!r}")
        if not _is_real(factor) or not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"{kind}_interval_factor must be a finite number > 0, got {factor!r}")
        _need_int(f"{kind}_final_interval", final, 1, allow_none=True)

        if kind == "curvature" and _follows_preconditioner(c):
            defaults = {
                "curvature_warmup_steps": 0,
                "curvature_warmup_ratio": 0.0,
                "curvature_interval_type": INTERVAL_CONSTANT,
                "curvature_interval_milestones": (),
                "curvature_interval_factor": 2.0,
                "curvature_final_interval": None,
            }
            for name, default in defaults.items():
                if getattr(c, name) != default:
                    raise ValueError(
                        f"{name}={getattr(c, name)!r} has no effect: with curvature_upd_interval=None and "
                        f"curvature_upd_ratio=None the curvature follows the preconditioner's schedule. "
                        f"Set curvature_upd_interval (or curvature_upd_ratio with num_total_steps), or "
                        f"leave {name} at its default"
                    )
            continue

        ratio_set = (
            (ratio is not None) if kind == "curvature" else (ratio != 1.0)
        ) or getattr(c, f"{kind}_warmup_ratio") != 0.0
        if ratio_set and T is None:
            raise ValueError(
                f"{kind}_upd_ratio / {kind}_warmup_ratio are fractions of num_total_steps, which is not "
                f"set: set num_total_steps, or use {kind}_upd_interval / {kind}_warmup_steps instead"
            )
        if _ratio_mode(c, kind):
            default_interval = None if kind == "curvature" else 1
            if interval != default_interval:
                raise ValueError(
                    f"{kind}_upd_interval={interval} and a ratio schedule ({kind}_upd_ratio with "
                    f"num_total_steps) are both set: keep one (ASDL silently ignores the interval)"
                )
            if getattr(c, f"{kind}_warmup_steps") != 0:
                raise ValueError(
                    f"{kind}_warmup_steps and a ratio schedule are both set: with num_total_steps use "
                    f"{kind}_warmup_ratio instead"
                )
            eff_ratio = 1.0 if ratio is None else ratio
            U = int(T * eff_ratio)
            W = int(T * getattr(c, f"{kind}_warmup_ratio"))
            if W > U:
                raise ValueError(
                    f"{kind}_warmup_ratio gives {W} warm-up steps, more than the {U} updates "
                    f"{kind}_upd_ratio allows in all: lower {kind}_warmup_ratio or raise {kind}_upd_ratio"
                )
            warmup = W
        else:
            warmup = getattr(c, f"{kind}_warmup_steps")

        if itype == INTERVAL_STEP:
            if len(milestones) == 0:
                raise ValueError(
                    f"{kind}_interval_type='step' needs {kind}_interval_milestones, the steps at which "
                    f"the interval is multiplied by {kind}_interval_factor, e.g. (100, 200)"
                )
            if milestones[0] < 1 or any(b <= a for a, b in zip(milestones, milestones[1:])):
                raise ValueError(
                    f"{kind}_interval_milestones must be strictly increasing steps >= 1, got {milestones}"
                )
        elif milestones:
            raise ValueError(
                f"{kind}_interval_milestones is set but {kind}_interval_type={itype!r}: milestones are "
                f"used by the 'step' type only"
            )
        if itype == INTERVAL_LINEAR:
            if final is None:
                raise ValueError(
                    f"{kind}_interval_type='linear' needs {kind}_final_interval, the interval reached at "
                    f"num_total_steps"
                )
            if T is None:
                raise ValueError(
                    f"{kind}_interval_type='linear' grows the interval over num_total_steps, which is not "
                    f"set: set num_total_steps"
                )
            if not _ratio_mode(c, kind) and warmup >= T:
                raise ValueError(
                    f"{kind}_warmup_steps={warmup} must be < num_total_steps={T} for a 'linear' interval"
                )
        elif final is not None:
            raise ValueError(
                f"{kind}_final_interval is set but {kind}_interval_type={itype!r}: the final interval is "
                f"used by the 'linear' type only"
            )


def _validate_ignore_modules(ignore_modules: Any) -> None:
    if ignore_modules is None:
        return
    if isinstance(ignore_modules, (str, nn.Module, type)):
        raise TypeError(
            f"ignore_modules must be a list, got a single {type(ignore_modules).__name__}: "
            f"wrap it, ignore_modules=[{ignore_modules!r}]"
        )
    try:
        entries = list(ignore_modules)
    except TypeError:
        raise TypeError(f"ignore_modules must be a list, got {type(ignore_modules).__name__}") from None
    for entry in entries:
        ok = (
            isinstance(entry, str)
            or isinstance(entry, nn.Module)
            or (isinstance(entry, type) and issubclass(entry, nn.Module))
        )
        if not ok:
            raise TypeError(
                f"ignore_modules entries must be nn.Module instances, nn.Module subclasses or name "
                f"substrings (str); got {entry!r} ({type(entry).__name__})"
            )
        if isinstance(entry, str) and entry == "":
            raise ValueError("ignore_modules contains '', which would match every module")


# ----------------------------------------------------------------------------------------------
# schedules (pure)
# ----------------------------------------------------------------------------------------------


class Schedule(NamedTuple):
    """A resolved refresh schedule for one kind (hashable; see the module docstring)."""

    warmup: int
    start_interval: int  # I0; 0 when no update follows the warm-up (ratio mode with U == W)
    interval_type: str
    milestones: tuple[int, ...]
    factor: float
    final_interval: int | None
    num_total_steps: int | None
    max_updates: int | None  # ratio mode: U; None in interval mode

    @property
    def ratio_mode(self) -> bool:
        return self.max_updates is not None


def resolve_schedule(config: PreconditioningConfig, kind: str) -> Schedule:
    """The :class:`Schedule` that ``config`` defines for ``kind`` (``'preconditioner'`` or
    ``'curvature'``); a curvature that follows the preconditioner gets the preconditioner's."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
    if kind == "curvature" and _follows_preconditioner(config):
        kind = "preconditioner"
    g = lambda name: getattr(config, f"{kind}_{name}")  # noqa: E731
    T = config.num_total_steps
    if _ratio_mode(config, kind):
        ratio = g("upd_ratio")
        U = int(T * (1.0 if ratio is None else ratio))
        W = int(T * g("warmup_ratio"))
        I0 = (T - W) // (U - W) if U > W else 0
        max_updates: int | None = U
    else:
        W, I0, max_updates = g("warmup_steps"), g("upd_interval"), None
    return Schedule(
        warmup=W,
        start_interval=I0,
        interval_type=g("interval_type"),
        milestones=tuple(g("interval_milestones")),
        factor=float(g("interval_factor")),
        final_interval=g("final_interval"),
        num_total_steps=T,
        max_updates=max_updates,
    )


def _as_schedule(config: PreconditioningConfig | Schedule, kind: str) -> Schedule:
    return config if isinstance(config, Schedule) else resolve_schedule(config, kind)


def _interval(step: int, s: Schedule) -> int:
    if step < s.warmup:
        return 1
    I0 = s.start_interval
    if s.interval_type == INTERVAL_CONSTANT:
        return I0
    if s.interval_type == INTERVAL_STEP:
        k = sum(1 for m in s.milestones if m <= step)
        return max(1, round(I0 * s.factor**k))
    T, W = s.num_total_steps, s.warmup
    frac = 1.0 if T <= W else min(1.0, (step - W) / (T - W))
    return max(1, round(I0 + (s.final_interval - I0) * frac))


def interval_at(step: int, config: PreconditioningConfig | Schedule, kind: str = "preconditioner") -> int:
    """The refresh interval in force at ``step`` (1 during the warm-up); see the module docstring."""
    return _interval(int(step), _as_schedule(config, kind))


@functools.lru_cache(maxsize=128)
def _plan(s: Schedule) -> tuple[frozenset, int | None, int]:
    """(refresh steps before the horizon, anchor, constant interval from the anchor on).

    Beyond the horizon (last milestone for 'step', ``T`` for 'linear', the end of the warm-up for
    'constant') the interval no longer changes, so the refresh steps from the anchor on are
    ``anchor + j * interval``. In ratio mode the set is complete and the anchor is None.
    """
    points = list(range(s.warmup))
    if s.ratio_mode:
        if s.start_interval > 0:
            p = s.warmup
            while p < s.num_total_steps:
                points.append(p)
                p += _interval(p, s)
        return frozenset(points[: s.max_updates]), None, 0
    if s.interval_type == INTERVAL_STEP:
        horizon = max(s.milestones)
    elif s.interval_type == INTERVAL_LINEAR:
        horizon = s.num_total_steps
    else:
        horizon = s.warmup
    p = s.warmup
    while p < horizon:
        points.append(p)
        p += _interval(p, s)
    return frozenset(points), p, _interval(p, s)


def is_update_step(step: int, config: PreconditioningConfig | Schedule, kind: str = "preconditioner") -> bool:
    """Whether ``kind`` is refreshed at ``step`` (0-based) under ``config``; pure, no warnings."""
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    points, anchor, interval = _plan(_as_schedule(config, kind))
    if step in points:
        return True
    if anchor is None or step < anchor:
        return False
    return (step - anchor) % interval == 0


def update_steps(config: PreconditioningConfig | Schedule, kind: str = "preconditioner", num_steps: int = 100) -> list[int]:
    """The refresh steps of ``kind`` among ``0 .. num_steps - 1``, in order."""
    s = _as_schedule(config, kind)
    return [t for t in range(int(num_steps)) if is_update_step(t, s)]
