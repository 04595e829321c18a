"""Per-sample gradients, their norms, Jacobians, jvp / vjp against the dense autograd reference
(:mod:`curvfun.testing.reference`), over random architectures, params subsets (in drawn order,
with values that may differ from the module's), batch sizes and losses."""

import pytest
import torch
from hypothesis import given, strategies as st

import curvfun
from curvfun.testing import checks, reference as ref, strategies as cst


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and on a loaded 2-core machine
    two threads made this module ~10x slower (spin-waiting). Restored after each test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

ALL_LOSSES = st.one_of(cst.losses(), st.just(cst.logcosh_loss))

# params subsets: "modules" = whole modules; "any" = any subset, where a module may contribute
# only some of its parameters (e.g. a Linear's bias without its weight; this was a KeyError /
# an over-count, fixed, see test_partial_module_params_*). Models here keep every parameter
# inside a standard layer; parameters outside layers are tested in
# test_per_sample_quantities_of_parameters_outside_layers.
SUBSETS = pytest.mark.parametrize("subset", ["modules", pytest.param(True, id="any")])
SUBSET_KW = {"modules": dict(subset="modules", root_params=False), True: dict(subset=True, root_params=False)}


@SUBSETS
@given(data=st.data())
def test_per_sample_grads_equal_loop_and_mean_equals_batch_gradient(subset, data):
    pb = data.draw(cst.problems(loss=ALL_LOSSES, **SUBSET_KW[subset]))
    got = checks.check_per_sample_grads(*pb.args)
    assert list(got) == list(pb.params), "result keys must follow params order"
    for k, v in got.items():
        assert v.shape == (pb.N, *pb.params[k].shape)


@SUBSETS
@given(data=st.data())
def test_per_sample_grads_out_buffers_are_filled_and_returned(subset, data):
    pb = data.draw(cst.problems(loss=cst.losses(), kinds=("mlp", "cnn", "sequence"), **SUBSET_KW[subset]))
    out = {k: torch.full((pb.N, *v.shape), float("nan")) for k, v in pb.params.items()}
    got = curvfun.per_sample_grads(*pb.args[:4], loss=pb.loss, out=out)
    expected = ref.per_sample_grads(*pb.args)
    checks.assert_close_trees(got, expected)
    checks.assert_close_trees(out, expected, what="out buffers")
    for k in pb.params:
        assert got[k].data_ptr() == out[k].data_ptr(), f"result[{k!r}] is not the out buffer"


@SUBSETS
@given(data=st.data())
def test_per_sample_grad_norms_equal_norms_of_materialised_grads(subset, data):
    pb = data.draw(cst.problems(loss=ALL_LOSSES, **SUBSET_KW[subset]))
    norms = curvfun.per_sample_grad_norms(*pb.args[:4], loss=pb.loss)
    G = ref.per_sample_grads_dense(*pb.args)
    assert norms.shape == (pb.N,)
    checks.assert_close(norms, G.norm(dim=1), what="per-sample grad norms")


@given(cst.problems(max_n=3))
def test_jacobian_equals_dense_reference(pb):
    J = curvfun.jacobian(pb.model, pb.params, pb.inputs)
    expected = ref.jacobian(pb.model, pb.params, pb.inputs)
    checks.assert_close_trees(J, expected, what="jacobian")
    for k, v in J.items():
        assert v.shape == (pb.N, *pb.case.out_shape, *pb.params[k].shape)


@given(cst.problems(), st.data())
def test_jvp_and_vjp_equal_dense_jacobian_products(pb, data):
    like = {k: v.detach() for k, v in pb.params.items()}
    v = data.draw(cst.vectors_like(like))
    Jv = curvfun.jvp(pb.model, pb.params, pb.inputs, v)
    checks.assert_close(Jv, ref.jvp(pb.model, pb.params, pb.inputs, v), what="jvp")
    u = torch.randn((pb.N, *pb.case.out_shape), generator=torch.Generator().manual_seed(data.draw(cst.seeds())))
    Jtu = curvfun.vjp(pb.model, pb.params, pb.inputs, u)
    checks.assert_close_trees(Jtu, ref.vjp(pb.model, pb.params, pb.inputs, u), what="vjp")
    # adjointness: <J v, u> = <v, Jᵀ u>
    checks.assert_close((Jv * u).sum(), sum((v[k] * Jtu[k]).sum() for k in like), what="<Jv,u> vs <v,Jᵀu>")


@SUBSETS
@given(data=st.data())
def test_gradient_functions_are_pure(subset, data):
    """The model's parameters, buffers and the params values are left untouched."""
    pb = data.draw(cst.problems(loss=cst.losses(), **SUBSET_KW[subset]))
    before_params = {k: v.detach().clone() for k, v in pb.model.named_parameters()}
    before_buffers = {k: v.clone() for k, v in pb.model.named_buffers()}
    given_params = {k: v.detach().clone() for k, v in pb.params.items()}
    curvfun.per_sample_grads(*pb.args[:4], loss=pb.loss)
    curvfun.per_sample_grad_norms(*pb.args[:4], loss=pb.loss)
    for k, v in pb.model.named_parameters():
        assert torch.equal(v, before_params[k]) and v.grad is None, k
    for k, v in pb.model.named_buffers():
        assert torch.equal(v, before_buffers[k]), k
    for k, v in pb.params.items():
        assert torch.equal(v, given_params[k]), k


def test_per_sample_grads_of_a_tied_weight_sum_over_its_uses():
    """A parameter shared by two modules gets the sum of both contributions."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(lin, torch.nn.Tanh(), lin).double()
    params = dict(model.named_parameters())  # names '0.weight', '0.bias' (deduplicated)
    x = torch.randn(4, 3)
    y = torch.randint(0, 3, (4,))
    checks.check_per_sample_grads(model, params, x, y, "cross_entropy")
    norms = curvfun.per_sample_grad_norms(model, params, x, y)
    checks.assert_close(norms, ref.per_sample_grads_dense(model, params, x, y).norm(dim=1))


def _partial_module_problem():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3)
    y = torch.randint(0, 2, (4,))
    return model, {"bias": model.bias}, x, y


def test_partial_module_params_per_sample_grads():
    """Minimal reproducer: params = {"bias": ...} of a Linear (weight held fixed)."""
    model, params, x, y = _partial_module_problem()
    checks.check_per_sample_grads(model, params, x, y, "cross_entropy")


def test_partial_module_params_per_sample_grad_norms():
    """Minimal reproducer: the norm must be that of the bias gradient only."""
    model, params, x, y = _partial_module_problem()
    norms = curvfun.per_sample_grad_norms(model, params, x, y)
    checks.assert_close(norms, ref.per_sample_grads_dense(model, params, x, y).norm(dim=1))


class _ScaledLinear(torch.nn.Module):
    """A Linear followed by a scalar parameter of the root module (outside any layer)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("names", [("scale",), ("lin.weight", "scale", "lin.bias")], ids=["scale", "all"])
def test_per_sample_quantities_of_parameters_outside_layers(loss, names):
    """Parameters outside supported layers (the vmap fallback): per-sample grads, their norms
    and the emp Fisher, alone and mixed with layer parameters. (Was a vmap RuntimeError from the
    data-dependent target check for cross_entropy / bce_with_logits.)"""
    torch.manual_seed(0)
    model = _ScaledLinear().double()
    named = dict(model.named_parameters())
    params = {k: named[k] for k in names}
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0]) if loss == "cross_entropy" else torch.rand(4, 2)
    checks.check_per_sample_grads(model, params, x, y, loss)
    checks.assert_close(curvfun.per_sample_grad_norms(model, params, x, y, loss=loss),
                        ref.per_sample_grads_dense(model, params, x, y, loss).norm(dim=1), what="norms")
    checks.assert_close(curvfun.fisher(model, params, x, y, loss=loss, fisher_type="emp"),
                        ref.emp_fisher(model, params, x, y, loss), what="emp Fisher")


@pytest.mark.parametrize("fn", ["per_sample_grads", "per_sample_grad_norms"])
def test_per_sample_grads_outside_layers_carry_no_autograd_graph(fn):
    """Minimal reproducer: params = {'scale': ...} of _ScaledLinear (lin.* held fixed)."""
    torch.manual_seed(0)
    model = _ScaledLinear().double()
    x = torch.randn(4, 3)
    out = getattr(curvfun, fn)(model, {"scale": model.scale}, x, torch.tensor([0, 1, 1, 0]))
    leaves = list(out.values()) if isinstance(out, dict) else [out]
    assert not any(t.requires_grad for t in leaves), [t.grad_fn for t in leaves]
