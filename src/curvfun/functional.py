"""``nn.Module`` + params pytree -> pure function, via ``torch.func.functional_call``.

``params`` is a mapping from parameter names (as in ``model.named_parameters()``) to
tensors. Parameters left out are held fixed at the module's own values, so passing a subset
restricts every curvature quantity to that subset. Buffers (BatchNorm running statistics)
are taken from the module and **cloned** for each call, so computing curvature never
updates a model's running statistics, in train or eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["check_params", "check_out", "model_fn", "call_model", "has_train_mode_batchnorm", "as_tuple",
           "twice_differentiable"]


def as_tuple(inputs: Any) -> tuple:
    """Model inputs as a tuple of positional arguments."""
    return inputs if isinstance(inputs, tuple) else (inputs,)


def check_params(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Validate that ``params`` names parameters of ``model`` with matching shapes.

    Returns ``params`` as a plain dict in the caller's order. Raises ``TypeError`` /
    ``ValueError`` naming the offending entry and what was expected.
    """
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a mapping name -> tensor such as dict(model.named_parameters()); "
            f"got {type(params).__name__}"
        )
    if len(params) == 0:
        raise ValueError("params is empty: pass dict(model.named_parameters()) or a non-empty subset of it")
    known = dict(model.named_parameters(remove_duplicate=False))
    for name, value in params.items():
        if name not in known:
            close = [k for k in known if k.split(".")[-1] == str(name).split(".")[-1]][:5]
            hint = f" Parameters with a similar name: {close}." if close else ""
            raise ValueError(
                f"params has an entry {name!r} that is not a parameter of {type(model).__name__}.{hint} "
                f"Build params from dict(model.named_parameters())."
            )
        if not isinstance(value, Tensor):
            raise TypeError(f"params[{name!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != known[name].shape:
            raise ValueError(
                f"params[{name!r}] has shape {tuple(value.shape)} but the model's parameter has shape "
                f"{tuple(known[name].shape)}"
            )
    return dict(params)


def check_out(out: Any, params: Mapping[str, Tensor], N: int) -> None:
    """Validate preallocated ``out`` buffers for per-sample results: a mapping whose entries name
    entries of ``params`` and are tensors of shape ``[N, *param.shape]`` with the parameter's dtype
    and device. Raises ``TypeError`` / ``ValueError`` naming the key, the expected and the given
    shape."""
    if out is None:
        return
    if not isinstance(out, Mapping):
        raise TypeError(f"out must be a dict name -> preallocated tensor [N, *param.shape], got {type(out).__name__}")
    for key, buf in out.items():
        if key not in params:
            raise ValueError(f"out has an entry {key!r} that is not in params; its keys must be among {list(params)}")
        p = params[key]
        want = (N, *p.shape)
        if not isinstance(buf, Tensor):
            raise TypeError(f"out[{key!r}] must be a tensor of shape {want}, got {type(buf).__name__}")
        if tuple(buf.shape) != want:
            raise ValueError(
                f"out[{key!r}] has shape {tuple(buf.shape)}, expected {want} ([N, *params[{key!r}].shape] "
                f"for N = {N} samples): allocate it with torch.empty({N}, *params[{key!r}].shape)"
            )
        if buf.dtype != p.dtype or buf.device != p.device:
            raise ValueError(
                f"out[{key!r}] is {buf.dtype} on {buf.device}, expected {p.dtype} on {p.device} like params[{key!r}]"
            )


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: b.clone() for k, b in model.named_buffers()}


def call_model(model: nn.Module, params: Mapping[str, Tensor], inputs: Any, buffers: dict | None = None) -> Any:
    """``model(*inputs)`` evaluated at ``params`` (a pure call: buffers are copies)."""
    bufs = _buffers(model) if buffers is None else buffers
    # parameters left out of ``params`` are held fixed: pass them detached, so that results
    # never hang on the model's own autograd graph
    fixed = {k: p.detach() for k, p in model.named_parameters() if k not in params}
    return functional_call(model, ({**fixed, **params}, bufs), as_tuple(inputs), tie_weights=True, strict=False)


def model_fn(model: nn.Module, inputs: Any = None) -> Callable:
    """Return ``f(params, *inputs) -> output`` (or ``f(params)`` when ``inputs`` is bound)."""
    if inputs is None:
        return lambda params, *args: call_model(model, params, args)
    bound = as_tuple(inputs)
    return lambda params: call_model(model, params, bound)


def has_train_mode_batchnorm(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules in train mode (their outputs mix samples of a batch)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


def twice_differentiable():
    """A context in which ``F.scaled_dot_product_attention`` takes its composite (math) kernel:
    the fused CPU/CUDA kernels have neither forward-mode derivatives nor double backward, which
    Hessian / GGN products (``jvp``, ``jvp`` of ``grad``) need. Same numbers, more memory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
