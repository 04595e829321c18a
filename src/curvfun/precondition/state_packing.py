"""Turn factor objects (frozen dataclasses of tensors) into plain containers and back.

``torch.save`` / ``torch.load(weights_only=True)`` accept dicts, lists, tuples, numbers,
strings and tensors only; curvature state holds dataclasses (``KronFactor``, ``LowRankKron``,
...). :func:`pack` writes ``{"__dataclass__": "module.Class", field: ...}``; :func:`unpack`
rebuilds from the classes listed in :data:`PACKABLE`. Tensors are cloned both ways.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import Tensor

#: dataclasses that may appear in saved state ("module:qualname")
PACKABLE = {
    "curvfun.kron.KronFactor",
    "curvfun.kron.KronInverse",
    "curvfun.kron.KronEigen",
    "curvfun.kron.EKFACFactor",
    "curvfun.kron.EmbeddingFactor",
    "curvfun.kron.UnitWiseFactor",
    "curvfun.kron.DiagFactor",
    "curvfun.kron.RelaidFactor",
    "curvfun.kron_rows.KronRowsFactor",
    "curvfun.kron_rows.KronRowsInverse",
    "curvfun.lowrank.LowRankKron",
    "curvfun.lowrank.WoodburyFactor",
    "curvfun.precondition.natural_gradient.DenseBlock",
    "curvfun.precondition.natural_gradient.RowsBlock",
}


def pack(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        path = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if path not in PACKABLE:
            raise TypeError(f"cannot save a {path} in a state dict; add it to state_packing.PACKABLE")
        out = {"__dataclass__": path}
        for f in dataclasses.fields(obj):
            out[f.name] = pack(getattr(obj, f.name))
        return out
    if isinstance(obj, dict):
        return {k: pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(pack(v) for v in obj)
    return obj


def unpack(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        if "__dataclass__" in obj:
            path = obj["__dataclass__"]
            if path not in PACKABLE:
                raise ValueError(f"state dict names an unknown class {path!r}")
            mod, _, name = path.rpartition(".")
            cls = getattr(importlib.import_module(mod), name)
            return cls(**{k: unpack(v) for k, v in obj.items() if k != "__dataclass__"})
        return {k: unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(unpack(v) for v in obj)
    return obj
