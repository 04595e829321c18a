"""Rows routes (:mod:`curvfun.rows`): Jacobian, GGN rows and Fisher / GGN full, block and
diagonal from one capture, against the dense autograd reference in float64; the diagonal forms
nothing of size P x P or K·N·P."""

import pytest
import torch
import zoo
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import curvfun
from curvfun.memory import CurvfunMemoryError, dense_limit
from curvfun.testing import checks
from curvfun.testing import reference as ref
from curvfun.testing import strategies as cst

LIKELIHOODS = cst.losses()
ANY_LOSS = st.one_of(cst.losses(), st.just(cst.logcosh_loss))
KINDS = ("mlp", "cnn", "sequence", "batchnorm")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@given(cst.problems(loss=LIKELIHOODS, kinds=KINDS, max_n=3))
def test_jacobian_equals_the_dense_jacobian(pb):
    J = curvfun.jacobian(pb.model, pb.params, pb.inputs)
    checks.assert_close_trees(J, ref.jacobian(pb.model, pb.params, pb.inputs))
    Jf = curvfun.jacobian(pb.model, pb.params, pb.inputs, flatten=True)
    dense = ref.jacobian_dense(pb.model, pb.params, pb.inputs)
    checks.assert_close(Jf, dense.reshape(pb.N, -1, pb.P))


@given(cst.problems(loss=LIKELIHOODS, kinds=KINDS, max_n=3), st.sampled_from(["exact", "emp"]))
def test_fisher_shapes_equal_the_dense_fisher(pb, fisher_type):
    F = ref.fisher(*pb.args, fisher_type=fisher_type)
    full = curvfun.fisher(*pb.args, fisher_type=fisher_type, shape="full")
    checks.assert_close(full, F)
    checks.assert_diag_matches_dense(curvfun.fisher(*pb.args, fisher_type=fisher_type, shape="diag"), F, pb.params)
    checks.assert_blocks_match_dense(curvfun.fisher(*pb.args, fisher_type=fisher_type, shape="block"), F, pb.params)


@given(cst.problems(loss=ANY_LOSS, kinds=KINDS, max_n=3))
def test_ggn_shapes_equal_the_dense_ggn(pb):
    G = ref.ggn(*pb.args)
    checks.assert_close(curvfun.ggn(*pb.args, shape="full"), G)
    checks.assert_diag_matches_dense(curvfun.ggn(*pb.args, shape="diag"), G, pb.params)
    checks.assert_blocks_match_dense(curvfun.ggn(*pb.args, shape="block"), G, pb.params)


@given(cst.problems(loss=ANY_LOSS, kinds=KINDS, max_n=3))
def test_ggn_rows_square_to_the_ggn(pb):
    R, w = curvfun.ggn_rows(*pb.args, flatten=True)
    assert R.shape[1:] == (pb.N, pb.P) and w.shape == (R.shape[0],)
    G = torch.einsum("k,knp,knq->pq", w, R, R) / pb.N
    checks.assert_close(G, ref.ggn(*pb.args))
    rows, _ = curvfun.ggn_rows(*pb.args)
    for k, p in pb.params.items():
        assert rows[k].shape == (R.shape[0], pb.N, *p.shape)


@given(cst.problems(loss="cross_entropy", kinds=KINDS, max_n=3, ignore=False), st.integers(1, 3), st.integers(0, 99))
def test_mc_fisher_is_the_empirical_fisher_at_the_sampled_targets(pb, M, seed):
    """With the same generator the MC columns are the NLL gradients at targets drawn by
    ``CrossEntropy.sample``: the MC Fisher is the mean of the M empirical Fishers there."""
    lik = curvfun.CrossEntropy()
    out = curvfun.functional.call_model(pb.model, pb.params, pb.inputs).detach()
    ys = lik.sample(out, M, torch.Generator().manual_seed(seed))
    F = sum(ref.emp_fisher(pb.model, pb.params, pb.inputs, ys[m], "cross_entropy") for m in range(M)) / M
    for shape in ("full", "diag"):
        got = curvfun.fisher(*pb.args, fisher_type="mc", shape=shape, n_mc_samples=M,
                             generator=torch.Generator().manual_seed(seed))
        if shape == "full":
            checks.assert_close(got, F)
        else:
            checks.assert_diag_matches_dense(got, F, pb.params)


@pytest.mark.parametrize("name", ["gpt", "gpt_tied", "lstm", "conv1d", "unet", "resnet_bn", "hand_attention"])
def test_zoo_models_equal_the_dense_reference(name):
    """Transformers (tied embeddings, attention's packed projection), an LSTM (exact fallback),
    transposed convolutions, eval-mode BatchNorm."""
    model, x, y, _ = zoo.build(name, n=2)
    params = dict(model.named_parameters())
    with curvfun.functional.twice_differentiable():
        J = curvfun.jacobian(model, params, x)
        G = ref.ggn(model, params, x, y)
        ggn_full = curvfun.ggn(model, params, x, y)
        ggn_diag = curvfun.ggn(model, params, x, y, shape="diag")
        fisher_diag = curvfun.fisher(model, params, x, y, fisher_type="exact", shape="diag")
    checks.assert_close_trees(J, ref.jacobian(model, params, x))
    checks.assert_close(ggn_full, G)
    checks.assert_diag_matches_dense(ggn_diag, G, params)
    checks.assert_diag_matches_dense(fisher_diag, G, params)


class _WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        self.spare = nn.Linear(2, 2)  # registered, never called

    def forward(self, x):
        return self.body(x)


def test_unused_registered_layer_gets_zero_rows():
    model = _WithSpare()
    params = dict(model.named_parameters())
    x, y = torch.randn(3, 3), torch.randint(0, 2, (3,))
    J = curvfun.jacobian(model, params, x)
    assert torch.count_nonzero(J["spare.weight"]) == 0 and J["spare.weight"].shape == (3, 2, 2, 2)
    checks.assert_close(curvfun.ggn(model, params, x, y), ref.ggn(model, params, x, y))


@pytest.mark.parametrize("P", [300, 700, 2100])
def test_sym_gram_is_the_gram_matrix(P):
    R = torch.randn(40, P, generator=torch.Generator().manual_seed(P))
    M = curvfun.linalg.sym_gram(R)
    checks.assert_close(M, R.T @ R)
    assert torch.equal(M, M.T)


def test_indefinite_output_hessian_takes_signed_columns():
    """ℓ = Σ sin(f): H_n = -diag(sin f_n) is indefinite; the GGN Jᵀ H J keeps its sign."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    params = dict(model.named_parameters())
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    loss = lambda out, t: torch.sin(out - t).sum(-1)  # noqa: E731
    G = ref.ggn(model, params, x, y, loss)
    assert torch.linalg.eigvalsh(G).min() < 0
    checks.assert_close(curvfun.ggn(model, params, x, y, loss), G)
    checks.assert_diag_matches_dense(curvfun.ggn(model, params, x, y, loss, shape="diag"), G, params)
    R, w = curvfun.ggn_rows(model, params, x, y, loss, flatten=True)
    assert (w < 0).any()
    checks.assert_close(torch.einsum("k,knp,knq->pq", w, R, R) / 4, G)


def test_train_mode_batchnorm_couples_the_samples():
    """Batch statistics make f_n depend on every sample: the routes take the whole-batch Jacobian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).train()
    params = dict(model.named_parameters())
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
    f = lambda th: functional_call(model, ref.unflatten(th, params), (x,))  # noqa: E731
    J = torch.autograd.functional.jacobian(f, theta)  # [N, C, P]
    out = f(theta).detach()
    H = torch.autograd.functional.hessian(
        lambda o: torch.nn.functional.cross_entropy(o.reshape(5, 3), y, reduction="sum"), out.reshape(-1))
    G = J.reshape(15, -1).T @ H @ J.reshape(15, -1) / 5
    checks.assert_close(curvfun.jacobian(model, params, x, flatten=True), J)
    checks.assert_close(curvfun.ggn(model, params, x, y), G)
    checks.assert_diag_matches_dense(curvfun.fisher(model, params, x, y, shape="diag"), G, params)


# --- memory: the diagonal forms no P x P and no K·N·P ----------------------------------


def _wide(conv: bool):
    torch.manual_seed(0)
    if conv:  # T > 1 positions: the per-column route of the affine family
        model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 10))
        x = torch.randn(8, 3, 6, 6)
    else:
        model = nn.Sequential(nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))
        x = torch.randn(8, 400)
    return model, dict(model.named_parameters()), x, torch.randint(0, 10, (8,))


@pytest.mark.parametrize("conv", [False, True])
def test_diag_stays_under_a_limit_that_refuses_the_rows(conv):
    model, params, x, y = _wide(conv)
    P = sum(p.numel() for p in params.values())
    N, K = 8, 10
    limit = K * N * P * 8 - 1  # float64: the rows [K, N, P] (and P x P) are refused
    with dense_limit(limit):
        with pytest.raises(CurvfunMemoryError, match=rf"^ggn_rows needs a {K} x {N} x {P} float64 tensor"):
            curvfun.ggn_rows(model, params, x, y)
        with pytest.raises(CurvfunMemoryError, match=rf"^ggn\(shape='full'\) needs a {P} x {P} float64 matrix"):
            curvfun.ggn(model, params, x, y)
        diag = curvfun.ggn(model, params, x, y, shape="diag")
        fdiag = curvfun.fisher(model, params, x, y, fisher_type="exact", shape="diag")
    R, w = curvfun.ggn_rows(model, params, x, y, flatten=True)
    expected = (R.pow(2) * w.reshape(-1, 1, 1)).sum((0, 1)) / N
    checks.assert_close(torch.cat([diag[k].reshape(-1) for k in params]), expected)
    checks.assert_close_trees(fdiag, diag)


def test_rows_are_refused_before_allocating_with_the_instruction():
    model, params, x, _ = _wide(False)
    with dense_limit(1000), pytest.raises(CurvfunMemoryError) as info:
        curvfun.jacobian(model, params, x)
    msg = str(info.value)
    assert msg.startswith("jacobian needs a 8 x 10 x ") and "use shape='diag', jvp / vjp" in msg, msg
    assert "curvfun.memory.set_dense_limit(...)" in msg
