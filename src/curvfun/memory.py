"""Dense requests sized before they are allocated.

A dense curvature matrix over P parameters holds P² numbers: 64 TiB in float32 for a
2048 x 2048 ``nn.Linear`` (P ≈ 4.2M). Every function and maker that materialises such a matrix
(or a Jacobian ``[N, outputs, P]``, or per-sample gradients ``[N, P]``) calls
:func:`check_dense_size` first, which refuses a request above the *dense limit* with
:class:`CurvfunMemoryError` (a ``MemoryError``) naming the size, the limit and how to raise it,
instead of handing it to the allocator.

The limit, in bytes, is the first of:

1. the value set by :func:`set_dense_limit` (``None`` resets, ``math.inf`` disables the check);
2. the environment variable ``CURVFUN_MAX_DENSE_BYTES`` (an integer number of bytes, or with a
   ``KiB`` / ``MiB`` / ``GiB`` / ``TiB`` suffix, e.g. ``"32GiB"``; ``"inf"`` disables), read at
   each check;
3. the default: ``min(8 GiB, half of the memory of the device the request lives on)`` (RAM for
   the CPU, the card's total memory for CUDA); 8 GiB where that memory cannot be read.

:func:`dense_limit` is a context manager that sets the limit for a block. The check counts one
copy of the requested tensor; the computations that build it may need a few more.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Sequence

import torch

__all__ = [
    "CurvfunMemoryError",
    "check_dense_size",
    "check_jacobian_size",
    "check_per_sample_size",
    "check_square",
    "dense_bytes",
    "dense_limit",
    "format_bytes",
    "get_dense_limit",
    "set_dense_limit",
    "ENV_VAR",
    "DEFAULT_CAP",
]

#: the environment variable read when no limit is set in the process
ENV_VAR = "CURVFUN_MAX_DENSE_BYTES"
#: the default limit's cap, in bytes (8 GiB)
DEFAULT_CAP = 8 * 2**30

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}
_limit: float | None = None


class CurvfunMemoryError(MemoryError):
    """A dense request larger than the dense limit (:mod:`curvfun.memory`), refused before
    allocating."""


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with one decimal, e.g. ``'64.0 TiB'``."""
    if math.isinf(n):
        return "no limit"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _parse_bytes(text: str) -> float:
    s = text.strip().lower().replace(" ", "")
    if s in ("inf", "none", "unlimited"):
        return math.inf
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([a-z]*)", s)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(
            f"{ENV_VAR}={text!r} is not a size: give a number of bytes, optionally with a unit "
            f"(KiB, MiB, GiB, TiB), e.g. {ENV_VAR}=32GiB, or 'inf' for no limit"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


@torch.compiler.assume_constant_result  # read once when traced (os.sysconf cannot be)
def _device_memory(device: torch.device | str | None) -> int | None:
    dev = torch.device("cpu" if device is None else device)
    try:
        if dev.type == "cuda":
            return int(torch.cuda.get_device_properties(dev).total_memory)
        if dev.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError, AssertionError):
        return None
    return None


def get_dense_limit(device: torch.device | str | None = None) -> float:
    """The dense limit in bytes for a request on ``device`` (see the module docstring)."""
    if _limit is not None:
        return _limit
    env = os.environ.get(ENV_VAR)
    if env:
        return _parse_bytes(env)
    mem = _device_memory(device)
    return float(DEFAULT_CAP if mem is None else min(DEFAULT_CAP, mem // 2))


def set_dense_limit(limit: float | int | str | None) -> None:
    """Set the dense limit for this process: bytes (int / float / ``'32GiB'``), ``math.inf`` for
    none, or ``None`` to go back to ``CURVFUN_MAX_DENSE_BYTES`` / the default."""
    global _limit
    if limit is None:
        _limit = None
        return
    value = _parse_bytes(limit) if isinstance(limit, str) else limit
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value <= 0:
        raise ValueError(f"the dense limit must be a positive number of bytes (or math.inf, or None), got {limit!r}")
    _limit = float(value)


@contextlib.contextmanager
def dense_limit(limit: float | int | str | None) -> Iterator[None]:
    """Set the dense limit inside a ``with`` block (see :func:`set_dense_limit`)."""
    global _limit
    old = _limit
    set_dense_limit(limit)
    try:
        yield
    finally:
        _limit = old


def dense_bytes(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a dense tensor of ``shape`` and ``dtype`` (exact integer arithmetic)."""
    n = 1
    for s in shape:
        n *= int(s)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return n * itemsize


def check_dense_size(
    what: str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    *,
    limit: float | None = None,
    instead: str = "",
) -> int:
    """Raise :class:`CurvfunMemoryError` if a dense ``shape`` tensor of ``dtype`` exceeds the dense
    limit (``limit`` bytes, default :func:`get_dense_limit`); return its size in bytes.

    ``what`` names the request (``"fisher(shape='full')"``); ``instead`` says what to use instead
    (appended to the message)."""
    nbytes = dense_bytes(shape, dtype)
    cap = get_dense_limit(device) if limit is None else float(limit)
    if nbytes > cap:
        dims = " x ".join(str(int(s)) for s in shape)
        kind = "matrix" if len(shape) == 2 else "tensor"
        dt = str(dtype).replace("torch.", "")
        hint = f"{instead}, " if instead else ""
        raise CurvfunMemoryError(
            f"{what} needs a {dims} {dt} {kind} ({format_bytes(nbytes)}); the limit is {format_bytes(cap)}: "
            f"{hint}or raise the limit with curvfun.memory.set_dense_limit(...) or the environment variable "
            f"{ENV_VAR} (bytes, e.g. 64GiB)"
        )
    return nbytes


def check_square(what: str, params, shape: str = "full", instead: str = "") -> None:
    """:func:`check_dense_size` for the ``[P, P]`` matrix over ``params`` (a dict of tensors), or
    for ``shape="block"`` its largest per-module block (module: the key up to its last '.')."""
    first = next(iter(params.values()), None)
    if first is None:
        return
    if shape == "block":
        sizes: dict[str, int] = {}
        for k, p in params.items():
            m = k.rsplit(".", 1)[0] if "." in k else ""
            sizes[m] = sizes.get(m, 0) + p.numel()
        P = max(sizes.values())
    else:
        P = sum(p.numel() for p in params.values())
    check_dense_size(what, (P, P), first.dtype, first.device, instead=instead)


def check_jacobian_size(model, params, inputs, N: int) -> None:
    """:func:`check_dense_size` for the Jacobian ``[N, outputs per sample, P]`` of ``model`` at
    ``params`` (one forward without autograd gives the output size)."""
    from .functional import call_model

    first = next(iter(params.values()), None)
    if first is None:
        return
    with torch.no_grad():
        out = call_model(model, params, inputs)
    if not isinstance(out, torch.Tensor):
        return
    O = out[0].numel() if out.ndim > 0 and out.shape[0] > 0 else out.numel()
    P = sum(p.numel() for p in params.values())
    check_dense_size("jacobian", (N, O, P), first.dtype, first.device,
                     instead="use jvp / vjp, the *_vp products or curvfun.kfac")


def check_per_sample_size(what: str, params, N: int) -> None:
    """:func:`check_dense_size` for per-sample gradients ``[N, P]`` over ``params``."""
    first = next(iter(params.values()), None)
    if first is None:
        return
    P = sum(p.numel() for p in params.values())
    check_dense_size(what, (N, P), first.dtype, first.device,
                     instead="use per_sample_grad_norms, a smaller batch or a subset of params")
