"""Hostile inputs to the functional API and the gradient makers: each gets a clear error (the test
asserts the message) or the documented fallback.

Functional API: empty batches, dense requests beyond the dense limit, wrong ``out=`` buffers,
swapped loss arguments. Makers: config and settings edited after construction, a changed model,
a different model in ``setup_model_call``, empty batches, dense requests, swapped loss arguments,
tampered state dicts."""

from __future__ import annotations

import copy
import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvfun
from curvfun import memory
from curvfun.memory import CurvfunMemoryError, dense_limit
from curvfun.precondition import (
    CurveBallGradientMaker,
    DiagNaturalGradientMaker,
    EkfacGradientMaker,
    EmpNaturalGradientMaker,
    FullNaturalGradientMaker,
    KfacGradientMaker,
    KronBfgsGradientMaker,
    KronPsgdGradientMaker,
    LayerWiseNaturalGradientMaker,
    LowRankKfacGradientMaker,
    NewtonGradientMaker,
    PreconditioningConfig,
    SengGradientMaker,
    ShampooGradientMaker,
    SmwEmpNaturalGradientMaker,
    UnitWiseNaturalGradientMaker,
)
from curvfun.precondition.guards import ModelChangedError
from maker_checks import train_steps

EMPTY = r"got an empty batch \(0 samples\)"


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def step(gm, model, x, t, loss_fn=F.cross_entropy):
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(loss_fn, y, t)
    return gm.forward_and_backward()


#: every maker in curvfun.precondition: name -> (factory(model, config), index of a layer it preconditions)
MAKERS = {
    "kfac": (lambda m, c: KfacGradientMaker(m, c), 3),
    "ekfac": (lambda m, c: EkfacGradientMaker(m, c), 3),
    "lowrank_kfac": (lambda m, c: LowRankKfacGradientMaker(m, c, rank=2), 3),
    "diag": (lambda m, c: DiagNaturalGradientMaker(m, c), 3),
    "unitwise": (lambda m, c: UnitWiseNaturalGradientMaker(m, c), 1),
    "layerwise": (lambda m, c: LayerWiseNaturalGradientMaker(m, c), 3),
    "full": (lambda m, c: FullNaturalGradientMaker(m, c), 3),
    "emp": (lambda m, c: EmpNaturalGradientMaker(m, c), 3),
    "shampoo": (lambda m, c: ShampooGradientMaker(m, c), 3),
    "seng": (lambda m, c: SengGradientMaker(m, c), 3),
    "smw": (lambda m, c: SmwEmpNaturalGradientMaker(m, c), 3),
    "newton": (lambda m, c: NewtonGradientMaker(m, c), 3),
    "curveball": (lambda m, c: CurveBallGradientMaker(m, c), 3),
    "kbfgs": (lambda m, c: KronBfgsGradientMaker(m, c), 3),
    "psgd": (lambda m, c: KronPsgdGradientMaker(m, c), 3),
}


def make(name, model=None, **config):
    model = mlp() if model is None else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = MAKERS[name][0](model, PreconditioningConfig(damping=1e-2, **config))
    return model, gm


def quiet_step(gm, model, x, t, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, message=".*cannot precondition.*")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*preconditions no layer.*")
        return step(gm, model, x, t, **kw)


# ================================================================================================
# functional API
# ================================================================================================


@pytest.mark.parametrize("fn", ["per_sample_grads", "per_sample_grad_norms", "fisher", "ggn", "hessian", "kfac"])
def test_functional_empty_batch(fn):
    model = mlp().eval()
    x, t = torch.randn(0, 4), torch.randint(0, 3, (0,))
    with pytest.raises(ValueError, match=EMPTY + r".*pass at least one sample"):
        getattr(curvfun, fn)(model, dict(model.named_parameters()), x, t)


def test_jacobian_empty_batch():
    model = mlp().eval()
    with pytest.raises(ValueError, match=EMPTY):
        curvfun.jacobian(model, dict(model.named_parameters()), torch.randn(0, 4))


def test_fisher_full_on_a_big_layer_is_refused_before_allocating():
    torch.manual_seed(0)
    big = nn.Linear(2048, 2048, dtype=torch.float32)
    x, t = torch.randn(2, 2048, dtype=torch.float32), torch.randint(0, 2048, (2,))
    with dense_limit(8 * 2**30):
        with pytest.raises(CurvfunMemoryError) as info:
            curvfun.fisher(big, dict(big.named_parameters()), x, t, fisher_type="emp", shape="full")
    msg = str(info.value)
    assert msg.startswith("fisher(shape='full') needs a 4196352 x 4196352 float32 matrix (64.1 TiB); the limit "
                          "is 8.0 GiB: pass shape='diag'"), msg
    assert "curvfun.memory.set_dense_limit(...)" in msg and "CURVFUN_MAX_DENSE_BYTES" in msg
    assert isinstance(info.value, MemoryError)


@pytest.mark.parametrize("fn,kw,what", [
    ("fisher", {"shape": "full"}, "fisher(shape='full')"),
    ("fisher", {"shape": "block"}, "fisher(shape='block')"),
    ("ggn", {"shape": "diag"}, "ggn(shape='diag')"),
    ("hessian", {"shape": "block"}, "hessian(shape='block')"),
])
def test_dense_requests_follow_the_limit(fn, kw, what):
    model = mlp().eval()
    params = dict(model.named_parameters())
    x, t = batch()
    P = sum(p.numel() for p in params.values())
    side = P if (fn != "fisher" or kw["shape"] == "full") else max(24 + 6, 6 + 6, 18 + 3)  # largest block
    with dense_limit(100):  # float64 (conftest)
        with pytest.raises(CurvfunMemoryError, match=rf"^{re.escape(what)} needs a {side} x {side} float64 matrix "
                                                     rf"\({side * side * 8 / 1024:.1f} KiB\); the limit is 100 B"):
            getattr(curvfun, fn)(model, params, x, t, **kw)
    with dense_limit(math.inf):  # raised: the same call runs
        getattr(curvfun, fn)(model, params, x, t, **kw)


def test_jacobian_size_counts_the_outputs():
    model = mlp().eval()
    params = dict(model.named_parameters())
    P = sum(p.numel() for p in params.values())
    x, _ = batch(5)
    with dense_limit(5 * 3 * P * 8 - 1):
        with pytest.raises(CurvfunMemoryError, match=rf"^jacobian needs a 5 x 3 x {P} float64 tensor"):
            curvfun.jacobian(model, params, x)
    with dense_limit(5 * 3 * P * 8):
        J = curvfun.jacobian(model, params, x)
    assert J["0.weight"].shape == (5, 3, 6, 4)


def test_per_sample_grads_size():
    model = mlp().eval()
    params = dict(model.named_parameters())
    P = sum(p.numel() for p in params.values())
    x, t = batch(8)
    with dense_limit(8 * P * 8 - 1):
        with pytest.raises(CurvfunMemoryError, match=rf"^per_sample_grads needs a 8 x {P} float64 matrix .*: use "
                                                     rf"per_sample_grad_norms, a smaller batch or a subset of params"):
            curvfun.per_sample_grads(model, params, x, t)
    with dense_limit(8 * P * 8):
        curvfun.per_sample_grads(model, params, x, t)


def test_dense_limit_settings(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "32GiB")
    assert memory.get_dense_limit() == 32 * 2**30
    monkeypatch.setenv(memory.ENV_VAR, "inf")
    assert memory.get_dense_limit() == math.inf
    monkeypatch.setenv(memory.ENV_VAR, "lots")
    with pytest.raises(ValueError, match=r"CURVFUN_MAX_DENSE_BYTES='lots' is not a size"):
        memory.get_dense_limit()
    monkeypatch.delenv(memory.ENV_VAR)
    assert 0 < memory.get_dense_limit() <= memory.DEFAULT_CAP
    memory.set_dense_limit("1 KiB")
    try:
        assert memory.get_dense_limit() == 1024
    finally:
        memory.set_dense_limit(None)
    with pytest.raises(ValueError, match="the dense limit must be a positive number of bytes"):
        memory.set_dense_limit(-5)


def test_out_buffers_are_checked():
    model = mlp().eval()
    params = dict(model.named_parameters())
    x, t = batch()
    with pytest.raises(ValueError, match=r"out\['0.weight'\] has shape \(8, 4, 6\), expected \(8, 6, 4\)"):
        curvfun.per_sample_grads(model, params, x, t, out={"0.weight": torch.empty(8, 4, 6)})
    with pytest.raises(ValueError, match=r"out\['0.weight'\] has shape \(7, 6, 4\), expected \(8, 6, 4\)"):
        curvfun.per_sample_grads(model, params, x, t, out={"0.weight": torch.empty(7, 6, 4)})
    with pytest.raises(ValueError, match=r"out has an entry 'nope' that is not in params"):
        curvfun.per_sample_grads(model, params, x, t, out={"nope": torch.empty(8, 6, 4)})
    with pytest.raises(ValueError, match=r"out\['0.bias'\] is torch.float32 on cpu, expected torch.float64"):
        curvfun.per_sample_grads(model, params, x, t, out={"0.bias": torch.empty(8, 6, dtype=torch.float32)})
    buf = torch.empty(8, 6, 4)
    G = curvfun.per_sample_grads(model, params, x, t, out={"0.weight": buf})
    assert G["0.weight"].data_ptr() == buf.data_ptr()


def test_swapped_targets_in_the_functional_api():
    model = mlp().eval()
    params = dict(model.named_parameters())
    x, _ = batch()
    logits_like = torch.randn(8, 3)
    for fisher_type in ("exact", "emp"):
        with pytest.raises(ValueError, match=r"cross_entropy: targets must be integer class indices, got dtype "
                                             r"torch.float64 of the logits' shape: were the logits passed as targets"):
            curvfun.fisher(model, params, x, logits_like, fisher_type=fisher_type)
    lik = curvfun.get_likelihood("cross_entropy")
    with pytest.raises(ValueError, match=r"cross_entropy: the model output has integer dtype torch.int64 .*were the "
                                         r"output and the targets swapped"):
        lik.check(torch.randint(0, 3, (8,)), logits_like)


# ================================================================================================
# makers: config and settings edited after construction
# ================================================================================================

CONFIG_EDITS = [
    ("damping", -1, ValueError, r"damping must be >= 0 \(it is added to the curvature before inverting\), got -1"),
    ("damping", float("nan"), TypeError, r"damping must be a finite number >= 0, got nan"),
    ("damping", "0.1", TypeError, r"damping must be a finite number >= 0, got '0.1'"),
    ("preconditioner_upd_interval", 0, ValueError, r"preconditioner_upd_interval must be >= 1, got 0"),
    ("preconditioner_upd_interval", -2, ValueError, r"preconditioner_upd_interval must be >= 1, got -2"),
    ("preconditioner_upd_interval", 1.5, TypeError, r"preconditioner_upd_interval must be an int, got 1.5"),
    ("curvature_upd_interval", 0, ValueError, r"curvature_upd_interval must be >= 1, got 0"),
    ("ema_decay", 2.0, ValueError, r"ema_decay must be in \(0, 1\]"),
]


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("field,value,exc,msg", CONFIG_EDITS, ids=[f"{f}={v!r}" for f, v, *_ in CONFIG_EDITS])
def test_config_edit_raises_at_the_next_step(name, field, value, exc, msg):
    model, gm = make(name)
    x, t = batch()
    quiet_step(gm, model, x, t)
    setattr(gm.config, field, value)
    with pytest.raises(exc, match=msg):
        quiet_step(gm, model, x, t)
    assert gm.step == 1  # the step did not run


@pytest.mark.parametrize("name", ["kfac", "ekfac", "diag", "layerwise", "shampoo"])
def test_fixed_config_resumes_without_a_stale_inverse(name):
    """damping=-1 used to be caught as a non-finite inverse (warned) and the stale inverse used forever."""
    model, gm = make(name)
    x, t = batch()
    quiet_step(gm, model, x, t)
    gm.config.damping = -1
    with warnings.catch_warnings():
        warnings.simplefilter("error", curvfun.precondition.NonFiniteCurvatureWarning)
        with pytest.raises(ValueError, match="damping must be >= 0"):
            quiet_step(gm, model, x, t)
    gm.config.damping = 1e-2
    quiet_step(gm, model, x, t)
    assert gm.step == 2 and not gm.nonfinite_counts


def test_argument_errors_in_an_inverse_propagate():
    _, gm = make("kfac")

    def bad():
        raise ValueError("damping must be a finite number >= 0, got -1")

    with pytest.raises(ValueError, match="got -1"):
        gm._invert("3", bad)


#: (maker, where: "config" or "maker", field, value, message)
MAKER_EDITS = [
    ("seng", "config", "damping", 0.0, r"SengGradientMaker needs damping > 0 \(it divides by λ\), got damping=0.0"),
    ("seng", "config", "ema_decay", 0.5, r"SengGradientMaker keeps one batch's factored gradients, with no moving "
                                         r"average"),
    ("kbfgs", "config", "damping", 0.0, r"KronBfgsGradientMaker needs damping > 0"),
    ("smw", "config", "damping", 0.0, r"SmwEmpNaturalGradientMaker needs damping > 0"),
    ("smw", "config", "preconditioner_upd_interval", 2, r"SmwEmpNaturalGradientMaker computes its curvature from the "
                                                        r"current batch on every step"),
    ("lowrank_kfac", "config", "ema_decay", 0.5, r"LowRankKfacGradientMaker keeps no EMA of its factors"),
    ("shampoo", "maker", "block_size", 0, r"block_size must be a positive tile size or -1 for no blocking, got 0"),
    ("shampoo", "maker", "root_method", "svd", r"root_method must be one of \('eigh', 'warm'\), got 'svd'"),
    ("curveball", "maker", "momentum", 2.0, r"momentum must be in \[0, 1\), got 2.0"),
    ("newton", "maker", "max_params", 0, r"max_params must be a positive int, got 0"),
    ("psgd", "maker", "precond_lr", 5.0, r"precond_lr must be in \(0, 1\]"),
    ("kbfgs", "maker", "mu1", 1.5, r"mu1 \(Powell's damping threshold\) must be in \(0, 1\), got 1.5"),
    ("seng", "maker", "sketching_size", 0, r"sketching_size must be a positive int, got 0"),
]


@pytest.mark.parametrize("name,where,field,value,msg", MAKER_EDITS, ids=[f"{n}-{f}" for n, _, f, *_ in MAKER_EDITS])
def test_maker_constraints_and_settings_edited_after_construction(name, where, field, value, msg):
    """The maker's own constraints on its config, and its own settings, re-checked at the next step."""
    model, gm = make(name)
    x, t = batch()
    quiet_step(gm, model, x, t)
    setattr(gm.config if where == "config" else gm, field, value)
    with pytest.raises(ValueError, match=msg):
        quiet_step(gm, model, x, t)


def test_a_replaced_config_object_is_validated():
    model, gm = make("kfac")
    x, t = batch()
    quiet_step(gm, model, x, t)
    gm.config = {"damping": 1e-3}
    with pytest.raises(TypeError, match=r"KfacGradientMaker.config must be a curvfun.precondition."
                                        r"PreconditioningConfig"):
        quiet_step(gm, model, x, t)


# ================================================================================================
# makers: a changed model
# ================================================================================================


def _replace(model, index):
    old = model[index]
    torch.manual_seed(5)
    new = nn.LayerNorm(6) if isinstance(old, nn.LayerNorm) else nn.Linear(6, 3)
    model[index] = new
    return new


CHANGED = (r"{}: the model changed since the maker was built \({}\); layers re-assigned, curvature restarts at the "
           r"next update")


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_replaced_layer_is_named_and_reassigned(name):
    model, gm = make(name)
    index = MAKERS[name][1]
    x, t = batch()
    quiet_step(gm, model, x, t)
    new = _replace(model, index)
    with pytest.warns(UserWarning, match=CHANGED.format(type(gm).__name__, rf"replaced: \['{index}'\]")):
        quiet_step(gm, model, x, t)
    assert gm.preconditioned_modules[str(index)] is new and gm.step == 2
    quiet_step(gm, model, x, t)  # and training goes on
    assert gm.step == 3


def _plain_grads(model, x, t):
    m = copy.deepcopy(model)
    m.zero_grad()
    F.cross_entropy(m(x), t).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def test_new_layer_keeps_the_plain_gradient_until_its_first_curvature_refresh():
    model, gm = make("kfac", preconditioner_upd_interval=3)
    x, t = batch()
    quiet_step(gm, model, x, t)  # step 0: refresh
    _replace(model, 3)
    plain = _plain_grads(model, x, t)
    with pytest.warns(UserWarning, match=r"replaced: \['3'\]"):
        quiet_step(gm, model, x, t)  # step 1: no refresh
    assert "3" not in gm.curvature and "3" not in gm.inverses
    assert torch.equal(model[3].weight.grad, plain["3.weight"])
    quiet_step(gm, model, x, t)  # step 2: no refresh
    plain = _plain_grads(model, x, t)
    quiet_step(gm, model, x, t)  # step 3: refresh -> curvature for the new layer
    assert "3" in gm.inverses
    assert not torch.allclose(model[3].weight.grad, plain["3.weight"])


def test_added_and_removed_layers_are_named():
    model, gm = make("kfac")
    x, t = batch()
    quiet_step(gm, model, x, t)
    model.append(nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=CHANGED.format("KfacGradientMaker", r"added: \['4'\]")):
        quiet_step(gm, model, x, t)
    assert "4" in gm.preconditioned_modules
    del model[4]
    model[3] = nn.Identity()  # the head is gone: 6 classes now, targets still in range
    with pytest.warns(UserWarning, match=r"removed: \['4'\]; replaced: \['3'\]"):
        quiet_step(gm, model, x, t)
    assert "3" not in gm.preconditioned_modules and "3" not in gm.curvature


def test_edited_ignore_modules_reassigns_the_layers():
    model, gm = make("kfac")
    x, t = batch()
    quiet_step(gm, model, x, t)
    gm.config.ignore_modules = [model[3]]
    with pytest.warns(UserWarning, match=CHANGED.format("KfacGradientMaker", "config.ignore_modules changed")):
        quiet_step(gm, model, x, t)
    assert "3" not in gm.preconditioned_modules and gm.step == 2
    assert gm.plain_modules["3"] == "ignored by config: instance Linear"


def test_unchanged_model_makes_no_warning():
    model, gm = make("kfac")
    x, t = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            step(gm, model, x, t)


@pytest.mark.parametrize("name", ["kfac", "shampoo", "newton"])
def test_a_different_model_in_setup_model_call_is_refused(name):
    model, gm = make(name)
    other = mlp(seed=3)
    x, t = batch()
    with pytest.raises(ModelChangedError, match=rf"{type(gm).__name__}.setup_model_call got a Sequential that is not "
                                                rf"the model this maker was built for"):
        gm.setup_model_call(other, x)
    with pytest.raises(ModelChangedError, match="not the model this maker was built for"):
        gm.setup_model_call(other.forward, x)
    gm.setup_model_call(lambda inp: model(inp), x)  # a function: cannot be checked, accepted
    gm.setup_model_call(model[0], x)  # a part of the model: accepted


# ================================================================================================
# makers: empty batch, dense requests, swapped loss arguments
# ================================================================================================


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_maker_empty_batch(name):
    model, gm = make(name)
    x, t = torch.randn(0, 4), torch.randint(0, 3, (0,))
    with pytest.raises(ValueError, match=rf"^{type(gm).__name__} " + EMPTY):
        quiet_step(gm, model, x, t)


def test_plain_gradient_maker_empty_batch():
    model = mlp()
    gm = curvfun.precondition.GradientMaker(model)
    with pytest.raises(ValueError, match="^GradientMaker " + EMPTY):
        step(gm, model, torch.randn(0, 4), torch.randint(0, 3, (0,)))


@pytest.mark.parametrize("cls,what", [
    (FullNaturalGradientMaker, "FullNaturalGradientMaker with EMA (ema_decay=0.5) needs a 4196352 x 4196352"),
    (LayerWiseNaturalGradientMaker, "LayerWiseNaturalGradientMaker with EMA (ema_decay=0.5) (largest layer) needs "
                                    "a 4196352 x 4196352"),
])
def test_dense_block_makers_with_ema_are_refused_at_construction(cls, what):
    torch.manual_seed(0)
    big = nn.Linear(2048, 2048, dtype=torch.float32)
    with dense_limit(8 * 2**30):
        with pytest.raises(CurvfunMemoryError, match=re.escape(what) + r" float32 matrix \(64.1 TiB\); the limit is "
                                                                        r"8.0 GiB: use ema_decay=-1"):
            cls(big, PreconditioningConfig(ema_decay=0.5))
        cls(big, PreconditioningConfig())  # without EMA: rows, never P x P


def test_dense_request_after_a_config_edit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    gm = FullNaturalGradientMaker(model, PreconditioningConfig())
    x, t = torch.randn(4, 64), torch.randint(0, 64, (4,))
    with dense_limit(1 * 2**20):
        step(gm, model, x, t)
        gm.config.ema_decay = 0.5
        with pytest.raises(CurvfunMemoryError, match=r"FullNaturalGradientMaker with EMA \(ema_decay=0.5\) needs a "
                                                     r"4160 x 4160 float64 matrix \(132.0 MiB\); the limit is 1.0 MiB"):
            step(gm, model, x, t)


def test_newton_dense_hessian_is_sized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    with dense_limit(2**20):
        with pytest.raises(CurvfunMemoryError, match=r"NewtonGradientMaker's dense Hessian needs a 4160 x 4160 float64 "
                                                     r"matrix"):
            NewtonGradientMaker(model, max_params=10**6)


@pytest.mark.parametrize("name", ["kfac", "shampoo", "newton", "curveball", "smw"])
def test_swapped_loss_arguments(name):
    model, gm = make(name)
    x, t = batch()
    model.zero_grad()
    y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, t, y)
    with pytest.raises(ValueError, match=rf"{type(gm).__name__}: loss_fn failed .*the loss's first argument has "
                                         rf"integer dtype torch.int64 \(shape \(8,\)\) while the second is "
                                         rf"torch.float64 of shape \(8, 3\): were the output and the targets swapped"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.forward_and_backward()


# ================================================================================================
# makers: tampered state dicts
# ================================================================================================


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


def test_tampered_kronecker_factor_is_refused_at_load_by_a_fresh_maker():
    model, gm = make("kfac")
    x, t = batch()
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), gm, [(x, t)] * 2)
    state = _roundtrip(gm.state_dict())
    A = state["maker_state"]["curvature"]["0"]["A"]
    assert A.shape == (4, 4)
    state["maker_state"]["curvature"]["0"]["A"] = torch.eye(5)
    _, fresh = make("kfac", model=copy.deepcopy(model))
    with pytest.raises(ValueError, match=r"the state dict does not fit KfacGradientMaker: "
                                         r"maker_state\['curvature'\]\['0'\].A: saved \(5, 5\), layer '0' \(weight "
                                         r"\(6, 4\)\) needs \(4, 4\)"):
        fresh.load_state_dict(state)
    assert fresh.step == 0 and not fresh.curvature  # nothing was loaded


@pytest.mark.parametrize("name,path", [("shampoo", ("statistics", "0.weight", 0, 1)), ("psgd", ("factors", "0", 0)),
                                       ("newton", ("hessian",))])
def test_tampered_state_is_refused_against_the_current_state(name, path):
    model, gm = make(name)
    x, t = batch()
    quiet_step(gm, model, x, t)
    state = _roundtrip(gm.state_dict())
    where = state["maker_state"]
    for k in path[:-1]:
        where = where[k]
    where[path[-1]] = torch.zeros(2, 2)
    path = r"maker_state" + "".join(rf"\[{k!r}\]" for k in path)
    with pytest.raises(ValueError, match=rf"the state dict does not fit {type(gm).__name__}: {path}: saved \(.*\), "
                                         rf"this maker \(.*\)"):
        gm.load_state_dict(state)


def test_state_of_another_model_is_refused():
    model, gm = make("kfac")
    x, t = batch()
    quiet_step(gm, model, x, t)
    state = gm.state_dict()
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(4, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3))
    _, gm2 = make("kfac", model=other)
    with pytest.raises(ValueError, match=r"state dict was saved for a model with another structure .*'0.weight', "
                                         r"\[6, 4\]\] vs model \['0.weight', \[7, 4\]\]"):
        gm2.load_state_dict(state)



def test_kronecker_shape_check_on_conv_layers():
    """Grouped and transposed convolutions: an intact state loads into a fresh maker; a tampered
    factor of the grouped convolution is refused with its layer's shapes."""

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ConvTranspose2d(4, 2, 2), nn.Flatten(),
                             nn.Linear(2 * 3 * 3, 3))

    model = net()
    x, t = torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = KfacGradientMaker(model, PreconditioningConfig(damping=1e-2))
        train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), gm, [(x, t)] * 2)
        state = _roundtrip(gm.state_dict())
        fresh = KfacGradientMaker(net(), PreconditioningConfig(damping=1e-2))
    fresh.load_state_dict(_roundtrip(state))
    assert set(fresh.curvature) == set(gm.curvature) >= {"0", "1"}
    A = state["maker_state"]["curvature"]["0"]["A"]
    assert A.shape == (2, 9, 9)  # 2 groups, 1 channel x 3 x 3 each
    state["maker_state"]["curvature"]["0"]["A"] = torch.zeros(2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = KfacGradientMaker(net(), PreconditioningConfig(damping=1e-2))
    with pytest.raises(ValueError, match=r"maker_state\['curvature'\]\['0'\].A: saved \(2, 8, 8\), layer '0' \(weight "
                                         r"\(4, 1, 3, 3\)\) needs \(2, 9, 9\)"):
        fresh.load_state_dict(state)
