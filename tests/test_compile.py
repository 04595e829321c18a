"""torch.compile: which calls trace whole (zero graph breaks by ``torch._dynamo.explain``) and
that compiled calls give the eager numbers in float64.

Whole graphs (``fullgraph=True``): ``ggn_vp``, ``hessian_vp``, ``per_sample_grads`` (under
compilation it takes its ``vmap(grad)`` route: the capture's module hooks cannot be traced), and
the math on captured layer data (``kron_factors_from_layer``: the K-FAC factors;
``per_sample_layer_grads`` / ``per_sample_layer_sq_norms``: the rows route). ``kfac`` itself
compiles with the capture running eagerly (``torch.compiler.disable``: its hooks swap module
parameters and it walks the autograd graph), which splits its graph at that call.

Compiling is slow on a 2-core CPU: tiny models, the ``aot_eager`` backend (dynamo + AOT
autograd, what decides graph breaks and traced numerics) for most checks, and the default
inductor backend once.
"""

import shutil
import warnings

import pytest
import torch
from torch import nn

import curvfun
from curvfun.capture import capture
from curvfun.kron_math import kron_factors_from_layer
from curvfun.layers import layer_data, per_sample_layer_grads, per_sample_layer_sq_norms

if not (hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()):  # pragma: no cover
    pytest.skip("torch.compile is not available on this Python / torch", allow_module_level=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch._dynamo.reset()


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    params = dict(model.named_parameters())
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    v = {k: torch.randn_like(p) for k, p in params.items()}
    return model, params, x, y, v


def _calls():
    """name -> (function of (params, x, y, v), its arguments): each claimed to trace whole."""
    model, params, x, y, v = _problem()
    emp = capture(model, params, x, y, fisher_type="emp")
    exact = capture(model, params, x, y, fisher_type="exact")
    emp_data = [layer_data(r, emp.weights) for r in emp.layers.values()]
    exact_data = [layer_data(r, exact.weights) for r in exact.layers.values()]
    return {
        "ggn_vp": (lambda p, x, y, v: curvfun.ggn_vp(model, p, x, y, v), (params, x, y, v)),
        "hessian_vp": (lambda p, x, y, v: curvfun.hessian_vp(model, p, x, y, v), (params, x, y, v)),
        "per_sample_grads": (lambda p, x, y: curvfun.per_sample_grads(model, p, x, y), (params, x, y)),
        "kron_factors_from_layer": (lambda: [(f.A, f.B) for f in map(kron_factors_from_layer, exact_data)], ()),
        "per_sample_layer_grads": (lambda: [per_sample_layer_grads(d) for d in emp_data], ()),
        "per_sample_layer_sq_norms": (lambda: [per_sample_layer_sq_norms(d) for d in emp_data], ()),
    }


NAMES = ["ggn_vp", "hessian_vp", "per_sample_grads", "kron_factors_from_layer", "per_sample_layer_grads",
         "per_sample_layer_sq_norms"]


def _assert_same(a, b, what):
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb) and la, what
    for s, t in zip(la, lb):
        assert s.dtype == torch.float64
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-14, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_zero_graph_breaks(name):
    fn, args = _calls()[name]
    ex = torch._dynamo.explain(fn)(*args)
    assert ex.graph_break_count == 0, f"{name}: {[str(r.reason)[:200] for r in ex.break_reasons]}"
    assert ex.graph_count == 1


@pytest.mark.parametrize("name", NAMES)
def test_fullgraph_equals_eager(name):
    fn, args = _calls()[name]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(compiled(*args), fn(*args), name)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
                    reason="inductor on the CPU needs a C++ compiler")
def test_per_sample_grads_inductor_equals_capture_route():
    """The default backend, and the compiled (vmap) route against the eager (capture) route."""
    model, params, x, y, _ = _problem()
    fn = lambda p, x, y: curvfun.per_sample_grads(model, p, x, y)  # noqa: E731
    _assert_same(torch.compile(fn, fullgraph=True)(params, x, y), fn(params, x, y), "inductor per_sample_grads")


def test_kfac_compiles_with_the_capture_eager():
    model, params, x, y, _ = _problem()

    def fn(p, x, y):
        return {n: (f.A, f.B) for n, f in curvfun.kfac(model, p, x, y, fisher_type="exact").items()}

    ex = torch._dynamo.explain(fn)(params, x, y)
    assert ex.graph_break_count >= 1  # the eager capture splits the graph
    torch._dynamo.reset()
    _assert_same(torch.compile(fn, backend="aot_eager")(params, x, y), fn(params, x, y), "kfac")
