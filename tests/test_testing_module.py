"""``curvfun.testing`` itself: the strategies produce what they promise, the reference is right
on identities it can check by itself (independent routes to the same matrix), and the checks
fail on wrong input. Nothing here depends on curvfun's fast implementations."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from curvfun import losses as L
from curvfun.testing import checks, reference as ref, strategies as cst


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and on a loaded 2-core machine
    two threads made this module ~10x slower (spin-waiting). Restored after each test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------
@given(cst.problems())
def test_problems_are_valid_float64_and_small(pb):
    assert all(p.dtype == torch.float64 for p in pb.model.parameters())
    names = [n for n, _ in pb.model.named_parameters()]
    assert pb.params and set(pb.params) <= set(names)
    for k, v in pb.params.items():
        assert v.shape == dict(pb.model.named_parameters())[k].shape
    assert 1 <= pb.N <= 4 and pb.P <= 300
    out = pb.model(pb.inputs)
    assert tuple(out.shape) == (pb.N, *pb.case.out_shape)
    # the library's likelihood accepts the targets (valid classes / shapes / ranges)
    if not callable(pb.loss) or isinstance(pb.loss, L.Likelihood):
        L.get_likelihood(pb.loss).check(out, pb.targets)
    assert "seed=" in repr(pb) and "Problem(" in repr(pb)


@given(cst.problems(loss=cst.losses()))
def test_reference_loss_matches_library_loss_and_direct_formula(pb):
    """The reference's per-sample losses (written independently) equal curvfun.losses' and a
    direct evaluation of the model at ``params``."""
    lik = L.get_likelihood(pb.loss)
    out = torch.func.functional_call(pb.model, pb.params, (pb.inputs,))
    expected = lik.per_sample(out, pb.targets)
    checks.assert_close(ref.per_sample_losses(*pb.args), expected, what="per-sample losses")
    checks.assert_close(ref.mean_loss(*pb.args), expected.mean(), what="mean loss")


@given(st.data())
def test_cnn_strategy_covers_conv_hyperparameters_within_size(data):
    case = data.draw(cst.cnns())
    conv = case.model[0]
    assert isinstance(conv, nn.Conv2d)
    assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
    assert case.model[-1].in_features <= 48
    x = case.make_inputs(2, torch.Generator().manual_seed(0))
    assert case.model(x).shape == (2, case.num_outputs)


@given(st.data())
def test_conv_net_and_attention_strategies_draw_valid_float64_models(data):
    """N-d (transposed) convolutions within the feature bound, attention in the drawn configuration;
    the same seed gives the same weights (attention's projections and bias_k included)."""
    case = data.draw(cst.conv_nets() | cst.attention_models())
    layer = case.model[0] if isinstance(case.model, nn.Sequential) else case.model.att
    assert isinstance(layer, (nn.modules.conv._ConvNd, nn.MultiheadAttention)), case
    if isinstance(layer, nn.modules.conv._ConvNd):
        assert case.model[-1].in_features <= 48
    x = case.make_inputs(2, torch.Generator().manual_seed(0))
    out = case.model(*x) if isinstance(x, tuple) else case.model(x)
    assert out.shape == (2, case.num_outputs) and out.dtype == torch.float64
    twin = cst._init_(copy.deepcopy(case.model), int(case.description.rsplit("seed=", 1)[1]))
    for (n, p), q in zip(case.model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_models_are_deterministic_given_the_seed():
    a = cst._init_(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), seed=123)
    b = cst._init_(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), seed=123)
    c = cst._init_(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), seed=124)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert p.dtype == torch.float64
        assert torch.equal(p, q), n
        assert not torch.equal(p, r), n


@given(st.data())
def test_batchnorm_models_are_in_eval_mode_with_nontrivial_stats(data):
    case = data.draw(cst.batchnorm_models())
    bns = [m for m in case.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(not m.training for m in bns)
    assert all((m.running_mean != 0).any() and (m.running_var != 1).any() for m in bns)
    before = {k: b.clone() for k, b in case.model.named_buffers()}
    x = case.make_inputs(3, torch.Generator().manual_seed(1))
    y = cst.make_targets(case, "mse", 3, torch.Generator().manual_seed(2))
    ref.ggn(case.model, dict(case.model.named_parameters()), x, y, "mse")
    for k, b in case.model.named_buffers():
        assert torch.equal(b, before[k]), f"reference changed buffer {k}"


@given(st.data())
def test_params_of_draws_subsets_in_drawn_order(data):
    case = data.draw(cst.models())
    params = data.draw(cst.params_of(case.model))
    named = dict(case.model.named_parameters())
    assert 1 <= len(params) <= len(named)
    for k, v in params.items():
        assert v.shape == named[k].shape and v.dtype == torch.float64


@given(cst.problems(loss="cross_entropy", kinds=("sequence",)))
def test_cross_entropy_targets_are_classes_or_ignore_index(pb):
    C = pb.case.num_outputs
    ii = pb.loss.ignore_index if isinstance(pb.loss, L.CrossEntropy) else -100
    y = pb.targets
    assert not y.dtype.is_floating_point
    assert (((y >= 0) & (y < C)) | (y == ii)).all()


@given(cst.spd_matrices(max_cond=1e3))
def test_spd_matrices_are_spd_with_bounded_condition(A):
    checks.assert_symmetric_psd(A)
    lam = torch.linalg.eigvalsh(A)
    assert lam.min() >= 1 - 1e-9 and lam.max() <= 1e3 * (1 + 1e-9)


@given(st.data())
def test_tensor_trees_and_vectors_like(data):
    tree = data.draw(cst.tensor_trees())
    v = data.draw(cst.vectors_like(tree))
    import optree

    assert optree.tree_structure(v) == optree.tree_structure(tree)
    for a, b in zip(optree.tree_leaves(v), optree.tree_leaves(tree)):
        assert a.shape == b.shape and a.dtype == torch.float64


# --------------------------------------------------------------------------------------
# reference: independent routes agree
# --------------------------------------------------------------------------------------
@given(cst.problems())
def test_reference_per_sample_grads_mean_is_batch_grad(pb):
    G = ref.per_sample_grads(*pb.args)
    assert list(G) == list(pb.params)
    checks.assert_close_trees({k: v.mean(0) for k, v in G.items()}, ref.batch_grad(*pb.args))
    E = ref.emp_fisher(*pb.args)
    Gd = ref.per_sample_grads_dense(*pb.args)
    checks.assert_close(E, sum(torch.outer(g, g) for g in Gd) / pb.N)
    checks.assert_symmetric_psd(E)


@given(cst.problems(loss=cst.losses(), max_n=3))
def test_reference_exact_fisher_by_enumeration_equals_autograd_ggn(pb):
    """Two independent computations: enumeration over classes / Bernoulli outcomes / the
    Gaussian closed form vs J_nᵀ (∇²_f ℓ_n) J_n with the output Hessian by autograd."""
    Fx = ref.exact_fisher(*pb.args)
    G = ref.ggn(*pb.args)
    checks.assert_close(Fx, G, what="enumerated Fisher vs autograd GGN")
    checks.assert_symmetric_psd(G)


@given(cst.problems(kinds=("linear",), loss=cst.losses()))
def test_reference_hessian_equals_ggn_for_linear_models(pb):
    checks.assert_close(ref.hessian(*pb.args), ref.ggn(*pb.args))


@given(cst.problems(loss=cst.losses(), max_n=3))
def test_reference_hessian_matches_double_backward(pb):
    theta = ref.flatten(pb.params).detach().requires_grad_(True)
    f = ref.output_fn(pb.model, pb.params, pb.inputs)
    Lval = ref._per_sample_loss_from_output(f(theta), pb.targets, pb.loss).mean()
    (g,) = torch.autograd.grad(Lval, theta, create_graph=True)
    rows = [torch.autograd.grad(g[i], theta, retain_graph=True, allow_unused=True)[0] for i in range(theta.numel())]
    H2 = torch.stack([torch.zeros_like(theta) if r is None else r for r in rows])
    checks.assert_close(ref.hessian(*pb.args), H2)


@given(cst.problems(max_n=3), st.data())
def test_reference_jacobian_jvp_vjp_against_torch_func(pb, data):
    model, params, x = pb.model, pb.params, pb.inputs
    J = ref.jacobian(model, params, x)
    assert list(J) == list(params)
    v = data.draw(cst.vectors_like({k: t.detach() for k, t in params.items()}))
    f = lambda p: torch.func.functional_call(model, p, (x,))
    _, Jv = torch.func.jvp(f, ({k: t.detach() for k, t in params.items()},), (v,))
    checks.assert_close(ref.jvp(model, params, x, v), Jv)
    u = torch.randn(Jv.shape, generator=torch.Generator().manual_seed(3))
    _, pull = torch.func.vjp(f, {k: t.detach() for k, t in params.items()})
    checks.assert_close_trees(ref.vjp(model, params, x, u), pull(u)[0], check_order=False)


def test_reference_flatten_uses_insertion_order():
    p = {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([[3.0]])}
    assert ref.flatten(p).tolist() == [1.0, 2.0, 3.0]
    back = ref.unflatten(torch.tensor([4.0, 5.0, 6.0]), p)
    assert list(back) == ["b", "a"] and back["a"].shape == (1, 1) and back["a"].item() == 6.0
    with pytest.raises(ValueError, match="expected a vector of 3 entries"):
        ref.unflatten(torch.zeros(4), p)


def test_reference_blocks_and_diag_views():
    M = torch.arange(36.0).reshape(6, 6)
    params = {"fc.weight": torch.zeros(2), "scale": torch.zeros(1), "fc.bias": torch.zeros(1), "head.w": torch.zeros(2)}
    blocks = ref.blocks_of(M, params)
    assert set(blocks) == {"fc", "", "head"}
    assert torch.equal(blocks["fc"], M[[0, 1, 3]][:, [0, 1, 3]])
    assert torch.equal(blocks[""], M[2:3, 2:3])
    assert torch.equal(blocks["head"], M[4:, 4:])
    d = ref.diag_of(M, params)
    assert list(d) == list(params) and d["head.w"].tolist() == [28.0, 35.0]


def test_reference_dense_from_matvec_roundtrip():
    M = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    like = {"x": torch.zeros(2, 2), "y": torch.zeros(1)}
    checks.assert_close(ref.dense_from_matvec(ref.matvec_from_dense(M, like), like), M)


def test_reference_cross_entropy_ignore_index_and_label_smoothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    params = dict(model.named_parameters())
    x = torch.randn(3, 3)
    y = torch.tensor([1, -100, 2])
    # the ignored sample contributes nothing: exact Fisher = (2/3) · Fisher of the other two
    F3 = ref.exact_fisher(model, params, x, y, "cross_entropy")
    F2 = ref.exact_fisher(model, params, x[[0, 2]], y[[0, 2]], "cross_entropy")
    checks.assert_close(F3, F2 * 2 / 3)
    checks.assert_close(ref.ggn(model, params, x, y, "cross_entropy"), F3)
    assert ref.per_sample_grads_dense(model, params, x, y, "cross_entropy")[1].abs().max() == 0
    # label smoothing changes the gradients, never the Fisher / GGN
    ls = L.CrossEntropy(label_smoothing=0.3)
    yv = torch.tensor([1, 0, 2])
    checks.assert_close(ref.exact_fisher(model, params, x, yv, ls), ref.exact_fisher(model, params, x, yv, "cross_entropy"))
    checks.assert_close(ref.ggn(model, params, x, yv, ls), ref.ggn(model, params, x, yv, "cross_entropy"))
    g_ls = ref.per_sample_grads_dense(model, params, x, yv, ls)
    g_0 = ref.per_sample_grads_dense(model, params, x, yv, "cross_entropy")
    assert (g_ls - g_0).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs a likelihood"):
        ref.exact_fisher(model, params, x, yv, cst.logcosh_loss)


# --------------------------------------------------------------------------------------
# checks: pass on right input, fail on wrong input
# --------------------------------------------------------------------------------------
def test_assert_symmetric_psd_rejects_indefinite_and_asymmetric():
    checks.assert_symmetric_psd(torch.eye(3))
    checks.assert_symmetric_psd(torch.zeros(2, 2))
    with pytest.raises(AssertionError, match="not positive semi-definite, smallest eigenvalue -1"):
        checks.assert_symmetric_psd(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(AssertionError, match="not symmetric"):
        checks.assert_symmetric_psd(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(AssertionError, match="not a square matrix"):
        checks.assert_symmetric_psd(torch.zeros(2, 3))


@given(cst.spd_matrices(min_n=2))
def test_assert_symmetric_psd_rejects_shifted_spd(A):
    lam_min = torch.linalg.eigvalsh(A)[0]
    with pytest.raises(AssertionError, match="not positive semi-definite"):
        checks.assert_symmetric_psd(A - (lam_min + 1e-3 * A.norm()) * torch.eye(A.shape[0]))


def test_assert_close_and_trees_report_what_differs():
    a = torch.tensor([1.0, 2.0, 3.0])
    checks.assert_close(a, a + 1e-12)
    with pytest.raises(AssertionError, match=r"1 of 3 entries differ; worst at \(1,\)"):
        checks.assert_close(a, torch.tensor([1.0, 2.1, 3.0]))
    with pytest.raises(AssertionError, match="shape"):
        checks.assert_close(a, a[:2])
    t = {"w": a, "b": a[:1]}
    checks.assert_close_trees(t, {"w": a.clone(), "b": a[:1].clone()})
    with pytest.raises(AssertionError, match="key order"):
        checks.assert_close_trees(t, {"b": a[:1], "w": a})
    checks.assert_close_trees(t, {"b": a[:1], "w": a}, check_order=False)
    with pytest.raises(AssertionError, match="keys differ: missing \\['c'\\]"):
        checks.assert_close_trees(t, {"w": a, "b": a[:1], "c": a})
    with pytest.raises(AssertionError, match=r"tree\['b'\]"):
        checks.assert_close_trees(t, {"w": a, "b": a[:1] + 1})


@given(cst.spd_matrices(min_n=2, max_n=6))
def test_assert_matvec_matches_dense_detects_a_wrong_matvec(A):
    n = A.shape[0]
    like = {"u": torch.zeros(1), "v": torch.zeros(n - 1)}
    checks.assert_matvec_matches_dense(ref.matvec_from_dense(A, like), A, like)
    wrong = A.clone()
    wrong[0, 1] += 1e-3 * A.norm()
    wrong[1, 0] += 1e-3 * A.norm()
    with pytest.raises(AssertionError, match="matvec"):
        checks.assert_matvec_matches_dense(ref.matvec_from_dense(wrong, like), A, like)
    # a matvec that returns its result in optree (sorted-key) order instead of like's order
    swapped = {"v": torch.zeros(n - 1), "u": torch.zeros(1)}
    with pytest.raises(AssertionError, match="key order"):
        checks.assert_matvec_matches_dense(lambda x: ref.unflatten(A @ ref.flatten(x), swapped), A, like)


def test_diag_and_block_assertions_detect_errors():
    M = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    params = {"a.w": torch.zeros(2), "a.b": torch.zeros(1), "c.w": torch.zeros(2)}
    checks.assert_diag_matches_dense(ref.diag_of(M, params), M, params)
    checks.assert_blocks_match_dense(ref.blocks_of(M, params), M, params)
    bad = ref.diag_of(M, params)
    bad["c.w"] = bad["c.w"] * 2
    with pytest.raises(AssertionError, match="diag"):
        checks.assert_diag_matches_dense(bad, M, params)
    with pytest.raises(AssertionError, match="blocks"):
        checks.assert_blocks_match_dense({"a": M[1:4, 1:4], "c": M[3:, 3:]}, M, params)  # shifted block
    with pytest.raises(AssertionError, match="keys differ"):
        checks.assert_blocks_match_dense({"a": M[:3, :3]}, M, params)  # missing module
    checks.assert_blocks_match_dense({"c": M[3:, 3:], "a": M[:3, :3]}, M, params)


def _ref_impls(scale_hessian=1.0):
    """curvfun-signature implementations built from the reference (optionally corrupted)."""

    def fisher(model, params, x, y, loss="cross_entropy", fisher_type="exact", shape="full", **kw):
        M = ref.fisher(model, params, x, y, loss, fisher_type)
        return {"full": M, "diag": ref.diag_of(M, params), "block": ref.blocks_of(M, params)}[shape]

    def ggn(model, params, x, y, loss="cross_entropy", shape="full"):
        M = ref.ggn(model, params, x, y, loss)
        return {"full": M, "diag": ref.diag_of(M, params), "block": ref.blocks_of(M, params)}[shape]

    def hessian(model, params, x, y, loss="cross_entropy", shape="full"):
        M = scale_hessian * ref.hessian(model, params, x, y, loss)
        return {"full": M, "diag": ref.diag_of(M, params), "block": ref.blocks_of(M, params)}[shape]

    def hessian_vp(model, params, x, y, v, loss="cross_entropy"):
        return ref.matvec_from_dense(scale_hessian * ref.hessian(model, params, x, y, loss), dict(params))(v)

    def psg(model, params, x, y, loss="cross_entropy"):
        return ref.per_sample_grads(model, params, x, y, loss)

    return fisher, ggn, hessian, hessian_vp, psg


def _fixed_problem(loss="cross_entropy"):
    g = torch.Generator().manual_seed(0)
    model = cst._init_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), seed=0)
    params = dict(model.named_parameters())
    x = torch.randn(4, 3, generator=g)
    y = torch.randint(0, 3, (4,), generator=g) if loss == "cross_entropy" else torch.randn(4, 3, generator=g)
    return model, params, x, y, loss


def test_identity_checks_pass_a_correct_and_fail_a_wrong_implementation():
    pb = _fixed_problem()
    fisher, ggn, hessian, hessian_vp, psg = _ref_impls()
    checks.check_fisher_equals_ggn(*pb, fisher=fisher, ggn=ggn)
    checks.check_curvature("hessian", *pb, fn=hessian)
    checks.check_curvature("fisher_emp", *pb, fn=fisher)
    checks.check_vp("hessian", *pb, fn=hessian_vp)
    checks.check_per_sample_grads(*pb, per_sample_grads=psg)
    _, _, bad_h, bad_hvp, _ = _ref_impls(scale_hessian=1.01)
    with pytest.raises(AssertionError, match="hessian full"):
        checks.check_curvature("hessian", *pb, fn=bad_h)
    with pytest.raises(AssertionError, match="hessian_vp"):
        checks.check_vp("hessian", *pb, fn=bad_hvp)
    # the empirical Fisher is not the exact Fisher
    emp_as_exact = lambda *a, fisher_type="exact", **kw: fisher(*a, fisher_type="emp", **kw)
    with pytest.raises(AssertionError, match="exact Fisher vs GGN"):
        checks.check_fisher_equals_ggn(*pb, fisher=emp_as_exact, ggn=ggn)
    # the Hessian of a nonlinear network is not its GGN
    with pytest.raises(AssertionError, match="ggn full"):
        checks.check_curvature("ggn", *pb, fn=hessian)
    # per-sample gradients scaled by N (sum instead of mean convention) are caught
    with pytest.raises(AssertionError, match="per_sample_grads"):
        checks.check_per_sample_grads(*pb, per_sample_grads=lambda *a, **kw: {k: 4 * v for k, v in psg(*a, **kw).items()})
    with pytest.raises(ValueError, match="kind must be one of"):
        checks.check_curvature("kfac", *pb, fn=hessian)
