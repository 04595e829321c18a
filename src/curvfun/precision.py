"""Mixed precision: the model runs under the caller's autocast, the curvature algebra never does.

Under ``torch.autocast`` (e.g. the CLI's ``--amp``: bf16 on CUDA) a matrix product inside a
curvature routine would run in bf16/fp16: Gram matrices, Cholesky factors and the preconditioning
products lose the digits a damped inverse needs (a bf16 Kronecker factor is often not positive
definite). curvfun therefore forms curvature in the parameters' dtype with autocast off, and
re-enters the caller's autocast only for the model's forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_DEVICE_TYPES = ("cpu", "cuda")

#: autocast settings as ``((device_type, dtype), ...)`` for the device types where it is enabled
AutocastState = tuple


def autocast_state() -> AutocastState:
    """The autocast settings in force now, to re-enter later with :func:`autocast_as`."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in _DEVICE_TYPES if torch.is_autocast_enabled(d))


@contextlib.contextmanager
def autocast_as(state: AutocastState) -> Iterator[None]:
    """Re-enter the autocast settings recorded by :func:`autocast_state` (nothing if none)."""
    with contextlib.ExitStack() as stack:
        for device_type, dtype in state:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        yield


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Autocast off for the enclosed code (on every device type where it is on)."""
    with contextlib.ExitStack() as stack:
        for device_type, _ in autocast_state():
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
