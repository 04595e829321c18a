"""API conventions: reduction mean / sum, torch.nn loss modules, return_output, one flat
parameter order, Kronecker factors as lists, accumulation over batches, create_graph, dict /
tuple inputs and plain callable models; each against torch.autograd on the same objective."""


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import curvfun
from curvfun.testing import checks
from curvfun.testing import reference as ref
from curvfun.testing import strategies as cst


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mlp(d_in=4, C=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 5), nn.Tanh(), nn.Linear(5, C))


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params.values()])


def _unflat(theta, params):
    out, i = {}, 0
    for k, p in params.items():
        out[k] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return out


def _autograd_hessian(model, params, x, objective):
    """∇²_θ objective(f(x; θ)) by torch.autograd.functional.hessian."""
    return torch.autograd.functional.hessian(
        lambda th: objective(functional_call(model, _unflat(th, params), (x,))), _flat(params))


def _autograd_ggn(model, params, x, objective):
    """Jᵀ (∇²_f objective) J with the batch Jacobian and the output Hessian by autograd."""
    th = _flat(params)
    out = functional_call(model, params, (x,)).detach()
    J = torch.autograd.functional.jacobian(lambda t: functional_call(model, _unflat(t, params), (x,)), th)
    J = J.reshape(out.numel(), -1)
    H = torch.autograd.functional.hessian(lambda o: objective(o.reshape(out.shape)), out.reshape(-1))
    return J.T @ H @ J


def _module_cases():
    torch.manual_seed(1)
    x = torch.randn(6, 4)
    y_cls = torch.randint(0, 3, (6,))
    y_cls_ign = y_cls.clone()
    y_cls_ign[[1, 4]] = -1
    y_reg = torch.randn(6, 3)
    y_bin = torch.randint(0, 2, (6, 3)).double()
    cases = []
    for red in ("mean", "sum"):
        cases += [
            (nn.CrossEntropyLoss(reduction=red), x, y_cls),
            (nn.CrossEntropyLoss(reduction=red, ignore_index=-1, label_smoothing=0.2), x, y_cls_ign),
            (nn.MSELoss(reduction=red), x, y_reg),
            (nn.BCEWithLogitsLoss(reduction=red), x, y_bin),
        ]
    return cases


MODULE_IDS = [f"{type(m).__name__}-{m.reduction}-{i}" for i, (m, _, _) in enumerate(_module_cases())]


@pytest.mark.parametrize("case", range(len(MODULE_IDS)), ids=MODULE_IDS)
def test_loss_modules_equal_autograd_on_the_module(case):
    module, x, y = _module_cases()[case]  # built in float64 (the conftest fixture)
    model = _mlp()
    params = dict(model.named_parameters())
    obj = lambda out: module(out, y)
    H = _autograd_hessian(model, params, x, obj)
    G = _autograd_ggn(model, params, x, obj)
    checks.assert_close(curvfun.hessian(model, params, x, y, loss=module), H)
    checks.assert_close(curvfun.ggn(model, params, x, y, loss=module), G)
    checks.assert_close(curvfun.fisher(model, params, x, y, loss=module, fisher_type="exact"), G)
    checks.assert_diag_matches_dense(curvfun.ggn(model, params, x, y, loss=module, shape="diag"), G, params)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    vf = _flat(v)
    checks.assert_close(_flat(curvfun.ggn_vp(model, params, x, y, v, loss=module)), G @ vf)
    checks.assert_close(_flat(curvfun.hessian_vp(model, params, x, y, v, loss=module)), H @ vf)
    checks.assert_close(_flat(curvfun.fisher_vp(model, params, x, y, v, loss=module)), G @ vf)
    _, out, value = curvfun.fisher(model, params, x, y, loss=module, fisher_type="emp", return_output=True)
    checks.assert_close(value, module(model(x), y))
    checks.assert_close(out, model(x))


@given(cst.problems(loss=st.sampled_from(["mse", "bce_with_logits"]), kinds=("mlp", "cnn", "sequence"), max_n=3,
                    subset=False), st.sampled_from(["mean", "sum"]))
def test_elementwise_loss_modules_on_any_output_shape(pb, red):
    """nn.MSELoss / nn.BCEWithLogitsLoss on [N, *positions, C] outputs: curvfun's curvature with the
    module equals autograd on the module applied to the whole output."""
    module = nn.MSELoss(reduction=red) if pb.loss == "mse" else nn.BCEWithLogitsLoss(reduction=red)
    f = ref.output_fn(pb.model, pb.params, pb.inputs)
    theta = _flat(pb.params)
    H = torch.autograd.functional.hessian(lambda th: module(f(th), pb.targets), theta)
    out = f(theta).detach()
    J = torch.autograd.functional.jacobian(f, theta).reshape(out.numel(), -1)
    Ho = torch.autograd.functional.hessian(lambda o: module(o.reshape(out.shape), pb.targets), out.reshape(-1))
    G = J.T @ Ho @ J
    checks.assert_close(curvfun.hessian(pb.model, pb.params, pb.inputs, pb.targets, loss=module), H)
    checks.assert_close(curvfun.ggn(pb.model, pb.params, pb.inputs, pb.targets, loss=module), G)
    checks.assert_diag_matches_dense(
        curvfun.fisher(pb.model, pb.params, pb.inputs, pb.targets, loss=module, shape="diag"), G, pb.params)


@given(cst.problems(loss=cst.losses(), kinds=("mlp", "cnn", "sequence"), max_n=3))
def test_sum_is_n_times_the_mean(pb):
    N = pb.N
    checks.assert_close(curvfun.ggn(*pb.args, reduction="sum"), N * ref.ggn(*pb.args))
    checks.assert_close(curvfun.hessian(*pb.args, reduction="sum"), N * ref.hessian(*pb.args))
    checks.assert_close(curvfun.fisher(*pb.args, fisher_type="emp", reduction="sum"), N * ref.emp_fisher(*pb.args))
    d = curvfun.fisher(*pb.args, fisher_type="exact", shape="diag", reduction="sum")
    checks.assert_diag_matches_dense(d, N * ref.exact_fisher(*pb.args), pb.params)


def test_sum_products_and_kfac():
    model = _mlp()
    params = dict(model.named_parameters())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    v = {k: torch.randn_like(p) for k, p in params.items()}
    for fn in (curvfun.ggn_vp, curvfun.hessian_vp, curvfun.fisher_vp):
        mean, total = fn(model, params, x, y, v), fn(model, params, x, y, v, reduction="sum")
        checks.assert_close_trees(total, {k: 5 * t for k, t in mean.items()})
    km = curvfun.kfac(model, params, x, y, fisher_type="emp")
    ks = curvfun.kfac(model, params, x, y, fisher_type="emp", reduction="sum")
    for name in km:
        checks.assert_close(ks[name].A, km[name].A)
        checks.assert_close(ks[name].B, 5 * km[name].B)


def test_return_output_gives_output_and_reduced_loss():
    model = _mlp()
    params = dict(model.named_parameters())
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    for fn, kw in ((curvfun.fisher, {"fisher_type": "exact", "shape": "diag"}), (curvfun.ggn, {}), (curvfun.hessian, {})):
        for red in ("mean", "sum"):
            res, out, value = fn(model, params, x, y, reduction=red, return_output=True, **kw)
            checks.assert_close(out, model(x))
            checks.assert_close(value, F.cross_entropy(model(x), y, reduction=red))
            checks.assert_close_trees(res, fn(model, params, x, y, reduction=red, **kw))
    _, out = curvfun.jacobian(model, params, x, return_output=True)
    checks.assert_close(out, model(x))


def test_one_flat_order_ravel_of_diag_is_diag_of_full():
    """``0.bias`` sorts before ``0.weight``; the flat order is the insertion order anyway."""
    model = _mlp()
    params = dict(model.named_parameters())
    assert list(params) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    full = curvfun.ggn(model, params, x, y)
    flat, unravel = curvfun.tree.ravel(curvfun.ggn(model, params, x, y, shape="diag"))
    checks.assert_close(flat, torch.diagonal(full))
    checks.assert_close(curvfun.tree.ravel(params)[0], torch.cat([p.reshape(-1) for p in model.parameters()]))
    assert list(unravel(flat)) == list(params)
    assert [t.shape for t in curvfun.tree.tree_leaves(params)] == [p.shape for p in model.parameters()]


def test_kfac_lists_are_per_parameter_in_order_with_the_scaling():
    """One sample repeated N times: K-FAC is exact for a one-layer model (A = a aᵀ, B = Σ_k g_k
    g_kᵀ), so ``kron(B, A)`` and ``B`` equal the exact Fisher's weight and bias blocks of the sum."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = dict(model.named_parameters())
    N = 3
    x, y = torch.randn(1, 4).expand(N, 4).clone(), torch.zeros(N, dtype=torch.long)
    lists = curvfun.kfac_lists(model, params, x, y, fisher_type="exact", reduction="sum")
    assert [len(f) for f in lists] == [2, 1]
    Fs = N * ref.exact_fisher(model, params, x, y)
    checks.assert_close(torch.kron(lists[0][0], lists[0][1]), Fs[:12, :12])
    checks.assert_close(lists[1][0], Fs[12:, 12:])
    mean = curvfun.kfac_lists(model, params, x, y, fisher_type="exact")
    checks.assert_close(mean[0][0] * N, lists[0][0])


def test_kfac_lists_names_what_has_no_factors():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"^kfac_lists: parameter '1.weight' \(UnitWiseFactor\) has no \[B, A\]"):
        curvfun.kfac_lists(model, params, torch.randn(2, 4), torch.randint(0, 3, (2,)), fisher_type="emp")


def _batches():
    torch.manual_seed(2)
    sizes = (3, 5, 1)
    xs = [torch.randn(n, 4) for n in sizes]
    ys = [torch.randint(0, 3, (n,)) for n in sizes]
    ys[1][2] = -1
    return xs, ys


@pytest.mark.parametrize("shape", ["full", "diag"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_accumulate_over_unequal_batches_is_the_whole_data_set(shape, red):
    model = _mlp()
    params = dict(model.named_parameters())
    xs, ys = _batches()
    X, Y = torch.cat(xs), torch.cat(ys)
    loss = curvfun.CrossEntropy(ignore_index=-1)
    got = curvfun.accumulate(curvfun.ggn, model, params, zip(xs, ys), loss=loss, reduction=red, shape=shape)
    checks.assert_close_trees(got, curvfun.ggn(model, params, X, Y, loss=loss, reduction=red, shape=shape))
    # a loss module's mean divides by the targets it counts (ignore_index left out), over the data set
    module = nn.CrossEntropyLoss(ignore_index=-1)
    got = curvfun.accumulate(curvfun.hessian, model, params, zip(xs, ys), loss=module, shape=shape)
    H = _autograd_hessian(model, params, X, lambda out: module(out, Y))
    if shape == "full":
        checks.assert_close(got, H)
    else:
        checks.assert_diag_matches_dense(got, H, params)


def test_accumulate_kfac_lists_and_products():
    model = _mlp()
    params = dict(model.named_parameters())
    xs, ys = _batches()
    ys = [y.clamp_min(0) for y in ys]
    X, Y = torch.cat(xs), torch.cat(ys)
    got = curvfun.accumulate(curvfun.kfac_lists, model, params, zip(xs, ys), fisher_type="exact")
    whole = curvfun.kfac_lists(model, params, X, Y, fisher_type="exact")
    checks.assert_close_trees(got, whole)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    got = curvfun.accumulate(curvfun.ggn_vp, model, params, zip(xs, ys), v, reduction="sum")
    checks.assert_close_trees(got, curvfun.ggn_vp(model, params, X, Y, v, reduction="sum"))


def test_accumulate_refuses_bad_batches():
    model = _mlp()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"^accumulate: batch 0 is a Tensor; expected \(inputs, targets\) pairs"):
        curvfun.accumulate(curvfun.ggn, model, params, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match=r"^accumulate: the iterable of batches was empty"):
        curvfun.accumulate(curvfun.ggn, model, params, [])


def test_create_graph_keeps_the_graph_to_the_inputs():
    model = _mlp()
    params = dict(model.named_parameters())
    x = torch.randn(4, 4, requires_grad=True)
    y = torch.randint(0, 3, (4,))
    g = curvfun.per_sample_grads(model, params, x, y, create_graph=True)
    J = curvfun.jacobian(model, params, x, create_graph=True)
    s = sum(t.pow(2).sum() for t in g.values()) + sum(t.sin().sum() for t in J.values())
    (dx,) = torch.autograd.grad(s, x)
    # autograd, one sample at a time
    ps = list(params.values())
    expected = torch.zeros_like(x)
    for n in range(4):
        xn = x[n : n + 1].detach().requires_grad_()
        out = model(xn)
        gn = torch.autograd.grad(F.cross_entropy(out, y[n : n + 1]), ps, create_graph=True)
        rows = [torch.autograd.grad(out[0, c], ps, create_graph=True) for c in range(3)]
        sn = sum(t.pow(2).sum() for t in gn) + sum(torch.stack([r[i] for r in rows]).sin().sum() for i in range(len(ps)))
        expected[n] = torch.autograd.grad(sn, xn)[0][0]
    checks.assert_close(dx, expected)
    checks.assert_close_trees({k: v.detach() for k, v in J.items()}, curvfun.jacobian(model, params, x.detach()))


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, d):
        return torch.tanh(self.a(d["x"])) + self.b(d["z"])


class _TupleInputs(_TwoInputs):
    def forward(self, x, z):
        return super().forward({"x": x, "z": z})


def test_dict_and_tuple_inputs_and_callable_models():
    torch.manual_seed(3)
    dm = _TwoInputs()
    tm = _TupleInputs()
    tm.load_state_dict(dm.state_dict())
    params = dict(dm.named_parameters())
    x, z, y = torch.randn(5, 4), torch.randn(5, 2), torch.randint(0, 3, (5,))
    G = ref.ggn(tm, params, (x, z), y)
    checks.assert_close(curvfun.ggn(dm, params, {"x": x, "z": z}, y), G)
    checks.assert_close(curvfun.ggn(tm, params, (x, z), y), G)
    checks.assert_close_trees(curvfun.jacobian(dm, params, {"x": x, "z": z}), ref.jacobian(tm, params, (x, z)))
    checks.assert_close_trees(curvfun.per_sample_grads(dm, params, {"x": x, "z": z}, y),
                              ref.per_sample_grads(tm, params, (x, z), y))

    def f(p, x, z):  # a plain callable: every route takes the exact fallback
        return torch.tanh(x @ p["a.weight"].T + p["a.bias"]) + z @ p["b.weight"].T + p["b.bias"]

    checks.assert_close(curvfun.ggn(f, params, (x, z), y), G)
    checks.assert_diag_matches_dense(curvfun.fisher(f, params, (x, z), y, shape="diag"), G, params)
    checks.assert_close_trees(curvfun.jacobian(f, params, (x, z)), ref.jacobian(tm, params, (x, z)))
    checks.assert_close_trees(curvfun.per_sample_grads(f, params, (x, z), y), ref.per_sample_grads(tm, params, (x, z), y))
    checks.assert_close(curvfun.hessian(f, params, (x, z), y), ref.hessian(tm, params, (x, z), y))


def test_bad_reductions_and_loss_modules_are_named():
    model = _mlp()
    params = dict(model.named_parameters())
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match=r"^unknown reduction 'avg'; expected one of \('mean', 'sum'\)"):
        curvfun.ggn(model, params, x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"^CrossEntropyLoss with class weights / pos_weight has no likelihood"):
        curvfun.ggn(model, params, x, y, loss=nn.CrossEntropyLoss(weight=torch.ones(3)))
    with pytest.raises(ValueError, match=r"^MSELoss\(reduction='none'\): curvfun needs reduction 'mean' or 'sum'"):
        curvfun.ggn(model, params, x, torch.randn(3, 3), loss=nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match=r"^reduction='sum' contradicts CrossEntropyLoss\(reduction='mean'\)"):
        curvfun.ggn(model, params, x, y, loss=nn.CrossEntropyLoss(), reduction="sum")
    with pytest.raises(TypeError, match=r"^loss module L1Loss is not supported"):
        curvfun.ggn(model, params, x, y, loss=nn.L1Loss())
    seq = nn.Linear(4, 3)
    with pytest.raises(ValueError, match=r"^nn.CrossEntropyLoss takes the class dim second"):
        curvfun.ggn(seq, dict(seq.named_parameters()), torch.randn(2, 5, 4), torch.randint(0, 3, (2, 5)),
                    loss=nn.CrossEntropyLoss())
