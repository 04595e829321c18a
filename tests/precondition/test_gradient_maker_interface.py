"""The ASDL-compatible GradientMaker interface, PreconditioningConfig, schedules and the
PreconditionedGradientMaker base (issue 5, part 1).

Expected refresh-step sets are written out by hand (or by a few lines in this file that follow the
documented rule), never by calling the schedule functions under test.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import logging
import math
import pickle
import warnings
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from curvfun.precondition import (
    DummyObject,
    DummyReplayError,
    GradientMaker,
    NonFiniteCurvatureWarning,
    PreconditionedGradientMaker,
    PreconditioningConfig,
    UnsupportedModuleWarning,
    assign_modules,
    interval_at,
    is_update_step,
    replay,
    update_steps,
)

# ----------------------------------------------------------------------------------------------
# models and helpers
# ----------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")



def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def batches(n: int, seed: int = 1, bs: int = 5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (bs,), generator=g)) for _ in range(n)]


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def plain_grads(model, loss_of_model):
    model.zero_grad()
    loss_of_model(model).backward()
    out = grads(model)
    model.zero_grad()
    return out


def all_equal(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(a, b) for a, b in zip(xs, ys))


# ----------------------------------------------------------------------------------------------
# 1. the ASDL README loop
# ----------------------------------------------------------------------------------------------


def test_asdl_readme_loop_gives_plain_gradients():
    from curvfun.precondition import GradientMaker, PreconditioningConfig  # the README's import, renamed

    batch_size = 5
    model = mlp()
    reference = copy.deepcopy(model)
    data_loader = batches(6, bs=batch_size)
    loss_fn = nn.CrossEntropyLoss()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = PreconditioningConfig(data_size=batch_size, damping=0.01)
    gm = GradientMaker(model, config)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)

    for x, t in data_loader:
        # <Standard>
        ref_opt.zero_grad()
        y_ref = reference(x)
        loss_ref = loss_fn(y_ref, t)
        loss_ref.backward()
        # <ASDL>
        optimizer.zero_grad()
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(loss_fn, dummy_y, t)
        y, loss = gm.forward_and_backward()

        assert torch.equal(y, y_ref) and torch.equal(loss, loss_ref)
        assert all_equal(grads(model), grads(reference))
        optimizer.step()
        ref_opt.step()
    assert all_equal(list(model.parameters()), list(reference.parameters()))
    assert gm.model_output is y and gm.loss is loss and torch.equal(gm.logits, y)


# ----------------------------------------------------------------------------------------------
# 2. dummies
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor


class Structured(nn.Module):
    """Returns tuple, dict, dataclass or (N, T, C) tensor outputs."""

    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)
        self.kind = kind

    def forward(self, x, scale=1.0):
        h = torch.tanh(self.body(x))
        logits = self.head(h) * scale
        if self.kind == "tuple":
            return logits, h
        if self.kind == "dict":
            return {"out": logits, "hidden": h}
        if self.kind == "dataclass":
            return Out(logits=logits, hidden=h)
        if self.kind == "seq":  # (N, 2, C): two positions per sample
            return torch.stack([logits, logits.flip(1)], dim=1)
        raise ValueError(self.kind)


X, T = batches(1, seed=7)[0]


def check_against_plain(model, setup, plain_loss):
    gm = GradientMaker(model)
    setup(gm)
    _, loss = gm.forward_and_backward()
    got = grads(model)
    want = plain_grads(model, plain_loss)
    assert torch.equal(loss, plain_loss(model))
    assert all_equal(got, want)
    return gm


def test_dummy_index_on_tuple_output_and_default_logits():
    model = Structured("tuple")

    def setup(gm):
        y = gm.setup_model_call(model, X)
        gm.setup_loss_call(F.cross_entropy, y[0], T)

    gm = check_against_plain(model, setup, lambda m: F.cross_entropy(m(X)[0], T))
    assert torch.equal(gm.logits, model(X)[0])  # default logits: first item


def test_dummy_key_on_dict_output_with_kwargs_and_logits_repr():
    model = Structured("dict")

    def setup(gm):
        y = gm.setup_model_call(model, X, scale=0.5)
        gm.setup_loss_call(F.cross_entropy, input=y["out"], target=T, label_smoothing=0.1)
        gm.setup_logits_repr(y["out"])

    gm = check_against_plain(model, setup, lambda m: F.cross_entropy(m(X, scale=0.5)["out"], T, label_smoothing=0.1))
    assert torch.equal(gm.logits, model(X, scale=0.5)["out"])


def test_dummy_attribute_on_dataclass_output_and_default_logits():
    model = Structured("dataclass")

    def setup(gm):
        y = gm.setup_model_call(model, X)
        # a dummy in the loss kwargs, one nested in a list argument
        gm.setup_loss_call(lambda outs, target: F.cross_entropy(outs[0], target) + outs[1].pow(2).mean(),
                           [y.logits, y.hidden], target=T)

    def plain(m):
        out = m(X)
        return F.cross_entropy(out.logits, T) + out.hidden.pow(2).mean()

    gm = check_against_plain(model, setup, plain)
    assert torch.equal(gm.logits, model(X).logits)  # default logits: the .logits attribute


def test_dummy_method_call_chains_with_dummy_arguments():
    model = Structured("seq")
    t2 = torch.cat([T, T.flip(0)])

    def setup(gm):
        y = gm.setup_model_call(model, X)
        # chain: index, method call with a dummy argument, reshape via .view(-1, n)
        logits = y[:, 0].add(y[:, 1], alpha=0.5).mul(2.0)
        flat = y.view(-1, y.shape[-1])
        gm.setup_loss_call(lambda a, b, t: F.cross_entropy(a, T) + F.cross_entropy(b, t), logits, flat, t=t2)
        gm.setup_logits_repr(flat)

    def plain(m):
        out = m(X)
        return F.cross_entropy(out[:, 0].add(out[:, 1], alpha=0.5).mul(2.0), T) + F.cross_entropy(
            out.view(-1, out.shape[-1]), t2
        )

    gm = check_against_plain(model, setup, plain)
    assert gm.logits.shape == (2 * X.shape[0], 4)


def test_setup_loss_repr_and_latest_setup_wins():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.lin = nn.Linear(6, 4)

        def forward(self, x, t):
            z = self.lin(x)
            return {"logits": z, "loss": F.cross_entropy(z, t)}

    model = WithLoss()

    def setup(gm):
        y = gm.setup_model_call(model, X, T)
        gm.setup_loss_call(F.mse_loss, y["logits"], torch.zeros(5, 4))  # replaced by the repr below
        gm.setup_loss_repr(y["loss"])

    gm = check_against_plain(model, setup, lambda m: m(X, T)["loss"])
    assert torch.equal(gm.logits, model(X, T)["logits"])  # default logits: the "logits" key


def test_dummy_repr_replay_and_misuse():
    y = DummyObject()
    chain = y.logits[0].view(-1, 3)
    assert repr(chain) == "DummyObject(output.logits[0].view(-1, 3))"
    out = Out(logits=torch.arange(6.0).reshape(1, 6), hidden=torch.zeros(1))
    assert torch.equal(replay(chain, out), torch.arange(6.0).reshape(2, 3))
    assert torch.equal(chain.eval(out), replay(chain, out))  # ASDL's name
    with pytest.raises(DummyReplayError, match=r"failed at output\.logitz .*AttributeError"):
        replay(y.logitz.sum(), out)
    with pytest.raises(TypeError, match="cannot iterate or unpack a DummyObject"):
        a, b = y
    with pytest.raises(TypeError, match="no truth value"):
        bool(y)
    with pytest.raises(TypeError, match="only records reads"):
        y.foo = 1
    assert copy.deepcopy(chain) is chain and copy.copy(chain) is chain  # immutable; dunders are not recorded
    assert repr(pickle.loads(pickle.dumps(chain))) == repr(chain)
    assert not hasattr(y, "__array__") and not hasattr(y, "_repr_html_")


def test_replay_error_reaches_the_user_with_the_chain():
    model = Structured("tuple")
    gm = GradientMaker(model)
    y = gm.setup_model_call(model, X)
    gm.setup_loss_call(F.cross_entropy, y[2], T)
    with pytest.raises(DummyReplayError, match=r"output\[2\].*IndexError"):
        gm.forward_and_backward()


def test_calls_out_of_order_raise_clear_errors():
    model = mlp()
    gm = GradientMaker(model)
    with pytest.raises(RuntimeError, match=r"forward_and_backward\(\) was called before setup_model_call\(\)"):
        gm.forward_and_backward()
    with pytest.raises(RuntimeError, match=r"setup_loss_call\(\) was called before setup_model_call\(\)"):
        gm.setup_loss_call(F.cross_entropy, DummyObject(), T)
    y = gm.setup_model_call(model, X)
    with pytest.raises(RuntimeError, match="no loss is set up"):
        gm.forward_and_backward()
    with pytest.raises(TypeError, match="dummy_logits must be a DummyObject"):
        gm.setup_logits_repr(torch.zeros(3))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        gm.setup_loss_call("cross_entropy", y, T)
    with pytest.raises(RuntimeError, match=r"backward\(\) was called before forward\(\)"):
        gm.backward()
    gm.setup_loss_call(F.cross_entropy, y, T, reduction="none")
    with pytest.raises(ValueError, match="the loss must be a scalar"):
        gm.forward_and_backward()
    gm.setup_loss_call(F.cross_entropy, y, T)
    gm.forward()
    gm.backward()
    with pytest.raises(RuntimeError, match=r"backward\(\) already ran"):
        gm.backward()


# ----------------------------------------------------------------------------------------------
# 3. config: ASDL fields and defaults, validation
# ----------------------------------------------------------------------------------------------

ASDL_DEFAULTS = dict(  # asdl/precondition/prec_grad_maker.py, ASDL 0.1
    num_total_steps=None,
    preconditioner_upd_interval=1,
    preconditioner_warmup_steps=0,
    preconditioner_upd_ratio=1.0,
    preconditioner_warmup_ratio=0.0,
    preconditioner_interval_type="constant",
    curvature_upd_interval=None,
    curvature_warmup_steps=0,
    curvature_upd_ratio=None,
    curvature_warmup_ratio=0.0,
    curvature_interval_type="constant",
    data_size=-1,
    damping=1e-7,
    ema_decay=-1,
    ignore_modules=None,
)


def test_config_has_asdl_fields_and_defaults_in_order():
    names = [f.name for f in dataclasses.fields(PreconditioningConfig)]
    assert names[: len(ASDL_DEFAULTS)] == list(ASDL_DEFAULTS)
    config = PreconditioningConfig()
    for name, value in ASDL_DEFAULTS.items():
        assert getattr(config, name) == value, name
    # curvature_interval_type is a real field here (a class attribute in ASDL)
    assert PreconditioningConfig(curvature_upd_interval=2, curvature_interval_type="step",
                                 curvature_interval_milestones=(5,)).curvature_interval_type == "step"
    assert PreconditioningConfig(ema_decay=None).ema_decay == -1 and not PreconditioningConfig().use_ema
    assert PreconditioningConfig(ema_decay=0.05).use_ema


BAD_CONFIGS = [
    (dict(damping=-0.1), ValueError, r"damping must be >= 0 .* got -0\.1; use a small positive value"),
    (dict(damping=float("nan")), TypeError, "damping must be a finite number"),
    (dict(preconditioner_upd_interval=0), ValueError, "preconditioner_upd_interval must be >= 1, got 0"),
    (dict(curvature_upd_interval=-3), ValueError, "curvature_upd_interval must be >= 1, got -3"),
    (dict(preconditioner_upd_interval=2.5), TypeError, "preconditioner_upd_interval must be an int"),
    (dict(preconditioner_warmup_steps=-1), ValueError, "preconditioner_warmup_steps must be >= 0"),
    (dict(ema_decay=1.5), ValueError, r"ema_decay must be in \(0, 1\] .* or -1 for no moving average"),
    (dict(ema_decay=0.0), ValueError, r"ema_decay must be in \(0, 1\]"),
    (dict(data_size=0), ValueError, "data_size must be a positive int"),
    (dict(preconditioner_interval_type="cosine"), ValueError,
     r"preconditioner_interval_type must be one of \('constant', 'step', 'linear'\), got 'cosine'"),
    (dict(curvature_upd_interval=3, curvature_interval_type="exp"), ValueError, "curvature_interval_type must be one of"),
    (dict(preconditioner_upd_ratio=0.1), ValueError,
     "fractions of num_total_steps, which is not set: set num_total_steps"),
    (dict(curvature_upd_ratio=0.5), ValueError, "curvature_upd_ratio / curvature_warmup_ratio are fractions"),
    (dict(num_total_steps=100, preconditioner_upd_ratio=1.5), ValueError, r"preconditioner_upd_ratio must be in \[0, 1\]"),
    (dict(num_total_steps=100, preconditioner_upd_ratio=0.1, preconditioner_upd_interval=10), ValueError,
     "are both set: keep one"),
    (dict(num_total_steps=100, preconditioner_upd_ratio=0.1, preconditioner_warmup_steps=5), ValueError,
     "use preconditioner_warmup_ratio instead"),
    (dict(num_total_steps=100, preconditioner_upd_ratio=0.1, preconditioner_warmup_ratio=0.2), ValueError,
     "gives 20 warm-up steps, more than the 10 updates"),
    (dict(num_total_steps=0), ValueError, "num_total_steps must be >= 1"),
    (dict(preconditioner_interval_type="step"), ValueError, "needs preconditioner_interval_milestones"),
    (dict(preconditioner_interval_type="step", preconditioner_interval_milestones=(20, 10)), ValueError,
     "must be strictly increasing"),
    (dict(preconditioner_interval_milestones=(10,)), ValueError, "milestones are used by the 'step' type only"),
    (dict(preconditioner_interval_type="step", preconditioner_interval_milestones=(10,),
          preconditioner_interval_factor=0), ValueError, "preconditioner_interval_factor must be a finite number > 0"),
    (dict(preconditioner_interval_type="linear", num_total_steps=10), ValueError, "needs preconditioner_final_interval"),
    (dict(preconditioner_interval_type="linear", preconditioner_final_interval=5), ValueError,
     "grows the interval over num_total_steps, which is not set"),
    (dict(preconditioner_final_interval=5), ValueError, "used by the 'linear' type only"),
    (dict(curvature_warmup_steps=5), ValueError, "curvature_warmup_steps=5 has no effect: .* Set curvature_upd_interval"),
    (dict(curvature_interval_type="step"), ValueError, "curvature_interval_type='step' has no effect"),
    (dict(ignore_modules="conv"), TypeError, r"ignore_modules must be a list, got a single str: wrap it, ignore_modules=\['conv'\]"),
    (dict(ignore_modules=[3]), TypeError, "ignore_modules entries must be nn.Module instances"),
    (dict(seed="x"), TypeError, "seed must be an int or None"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CONFIGS, ids=[str(k) for k, _, _ in BAD_CONFIGS])
def test_bad_config_raises_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PreconditioningConfig(**kwargs)


def test_config_edited_after_construction_is_checked_by_the_maker():
    config = PreconditioningConfig()
    config.damping = -1.0
    with pytest.raises(ValueError, match="damping must be >= 0"):
        Counting(mlp(), config)
    with pytest.raises(TypeError, match="config must be a curvfun.precondition.PreconditioningConfig"):
        Counting(mlp(), {"damping": 1e-3})


# ----------------------------------------------------------------------------------------------
# 4. schedules
# ----------------------------------------------------------------------------------------------


def linear_rule(num_steps, W, I0, I_end, T):
    """The documented 'linear' rule, written out here independently."""
    out, p = set(range(W)), W
    while p < num_steps:
        out.add(p)
        frac = min(1.0, (p - W) / (T - W))
        p += max(1, round(I0 + (I_end - I0) * frac))
    return out


N = 100
SCHEDULE_CASES = {
    # name: (config kwargs, expected preconditioner steps, expected curvature steps) over N steps
    "asdl_default": (dict(), set(range(N)), set(range(N))),
    "constant_warmup": (
        dict(preconditioner_upd_interval=7, preconditioner_warmup_steps=3),
        {0, 1, 2} | {3 + 7 * k for k in range(14)},  # 3, 10, ..., 94
        {0, 1, 2} | {3 + 7 * k for k in range(14)},  # curvature follows the preconditioner
    ),
    "own_curvature_interval": (
        dict(preconditioner_upd_interval=10, curvature_upd_interval=4, curvature_warmup_steps=2),
        set(range(0, 100, 10)),
        {0, 1} | set(range(2, 100, 4)),
    ),
    "step": (
        dict(preconditioner_upd_interval=2, preconditioner_interval_type="step",
             preconditioner_interval_milestones=(10, 30), preconditioner_interval_factor=3),
        # gap 2 before step 10, 6 from step 10, 18 from step 30 (the gap after a refresh is the
        # interval in force at that refresh: 28 -> 34 uses 6, 34 -> 52 uses 18)
        {0, 2, 4, 6, 8, 10, 16, 22, 28, 34, 52, 70, 88},
        {0, 2, 4, 6, 8, 10, 16, 22, 28, 34, 52, 70, 88},
    ),
    "step_curvature_halving": (
        dict(preconditioner_upd_interval=25, curvature_upd_interval=8, curvature_interval_type="step",
             curvature_interval_milestones=(40,), curvature_interval_factor=0.5),
        {0, 25, 50, 75},
        {0, 8, 16, 24, 32, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96},
    ),
    "linear": (
        dict(num_total_steps=100, preconditioner_upd_interval=2, preconditioner_warmup_steps=4,
             preconditioner_interval_type="linear", preconditioner_final_interval=12),
        linear_rule(N, W=4, I0=2, I_end=12, T=100),
        linear_rule(N, W=4, I0=2, I_end=12, T=100),
    ),
    "ratio": (
        # ASDL's ratio rule: U = 30 updates in all, W = 10 warm-up steps, interval floor(90 / 20) = 4
        dict(num_total_steps=100, preconditioner_upd_ratio=0.3, preconditioner_warmup_ratio=0.1),
        set(range(10)) | {10 + 4 * j for j in range(20)},
        set(range(10)) | {10 + 4 * j for j in range(20)},
    ),
    "ratio_curvature_and_step": (
        # preconditioner: U = 20, interval 5, doubled at step 50 -> 0..50 by 5, then 60, 70, 80, 90
        # curvature: U = 50, W = 5, interval floor(95 / 45) = 2, capped at 50 updates in all
        dict(num_total_steps=100, preconditioner_upd_ratio=0.2, preconditioner_interval_type="step",
             preconditioner_interval_milestones=(50,), curvature_upd_ratio=0.5, curvature_warmup_ratio=0.05),
        set(range(0, 51, 5)) | {60, 70, 80, 90},
        set(range(5)) | {5 + 2 * j for j in range(45)},
    ),
    "ratio_linear": (
        dict(num_total_steps=100, preconditioner_upd_ratio=0.25, preconditioner_interval_type="linear",
             preconditioner_final_interval=8),
        linear_rule(N, W=0, I0=4, I_end=8, T=100),
        linear_rule(N, W=0, I0=4, I_end=8, T=100),
    ),
}


def test_linear_rule_helper_matches_a_hand_computed_prefix():
    # W=4, I0=2, I_end=12, T=100: gaps round(2 + 10 * (p - 4) / 96)
    # p=4: 2 -> 6: 2.21 -> 2 -> 8: 2.42 -> 2 -> 10: 2.63 -> 3 -> 13: 2.94 -> 3 -> 16: 3.25 -> 3 -> 19
    assert sorted(linear_rule(20, 4, 2, 12, 100)) == [0, 1, 2, 3, 4, 6, 8, 10, 13, 16, 19]


@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_schedule_refresh_steps(name):
    kwargs, want_prec, want_curv = SCHEDULE_CASES[name]
    config = PreconditioningConfig(**kwargs)
    assert set(update_steps(config, "preconditioner", N)) == want_prec
    assert set(update_steps(config, "curvature", N)) == want_curv


@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_maker_calls_updates_on_exactly_the_scheduled_steps(name):
    kwargs, want_prec, want_curv = SCHEDULE_CASES[name]
    model = mlp()
    gm = Counting(model, PreconditioningConfig(**kwargs))
    x, t = batches(1)[0]
    for _ in range(N):
        model.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
    assert set(gm.curvature_steps) == want_curv and len(gm.curvature_steps) == len(want_curv)
    assert set(gm.preconditioner_steps) == want_prec
    assert gm.precondition_steps == list(range(N))
    assert gm.step == N


def test_ratio_schedule_stops_at_num_total_steps_with_one_warning():
    config = PreconditioningConfig(num_total_steps=10, preconditioner_upd_ratio=0.5)
    assert [t for t in range(20) if is_update_step(t, config)] == [0, 2, 4, 6, 8]
    model = mlp()
    gm = Counting(model, config)
    x, t = batches(1)[0]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(13):
            y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, y, t)
            gm.forward_and_backward()
    past = [w for w in rec if "past num_total_steps=10" in str(w.message)]
    assert len(past) == 1  # once, for the preconditioner (the curvature follows it)
    assert gm.preconditioner_steps == [0, 2, 4, 6, 8]


@given(interval=st.integers(1, 12), warmup=st.integers(0, 15))
def test_constant_interval_is_asdls_rule(interval, warmup):
    config = PreconditioningConfig(preconditioner_upd_interval=interval, preconditioner_warmup_steps=warmup)
    # ASDL's _do_update_by_interval
    want = [s for s in range(120) if s < warmup or (s - warmup) % interval == 0]
    assert update_steps(config, num_steps=120) == want


@given(
    interval=st.integers(1, 6),
    milestones=st.lists(st.integers(1, 150), min_size=1, max_size=4, unique=True).map(lambda m: tuple(sorted(m))),
    factor=st.sampled_from([0.5, 1.5, 2.0, 3.0]),
)
def test_step_interval_gaps_follow_the_milestones(interval, milestones, factor):
    config = PreconditioningConfig(preconditioner_upd_interval=interval, preconditioner_interval_type="step",
                                   preconditioner_interval_milestones=milestones, preconditioner_interval_factor=factor)
    steps = update_steps(config, num_steps=300)
    assert steps[0] == 0
    for a, b in zip(steps, steps[1:]):
        k = sum(m <= a for m in milestones)
        assert b - a == max(1, round(interval * factor**k))
    assert interval_at(0, config) == interval


# ----------------------------------------------------------------------------------------------
# tiny makers used by the tests
# ----------------------------------------------------------------------------------------------


class Counting(PreconditionedGradientMaker):
    """Records on which steps the hooks run; preconditions nothing."""

    def __init__(self, model, config=None, **kw):
        super().__init__(model, config, **kw)
        self.curvature_steps, self.preconditioner_steps, self.precondition_steps = [], [], []

    def update_curvature(self):
        self.curvature_steps.append(self.step)
        self.forward()
        self.backward()

    def update_preconditioner(self):
        self.preconditioner_steps.append(self.step)

    def precondition(self):
        self.precondition_steps.append(self.step)


class NoisyDiag(PreconditionedGradientMaker):
    """A diagonal preconditioner with MC noise, EMA and damped inverse: state in tensors + RNG."""

    _supported_classes = (nn.Linear,)
    _state_attributes = ("ema", "inv", "n_updates")

    def __init__(self, model, config=None, **kw):
        super().__init__(model, config, **kw)
        self.ema, self.inv, self.n_updates = {}, {}, 0

    def update_curvature(self):
        self.forward()
        self.backward()
        decay = self.config.ema_decay if self.config.use_ema else 1.0
        for name in self.preconditioned_modules:
            for local, p in self.module_params(name).items():
                key = f"{name}.{local}"
                noise = torch.rand(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
                new = p.grad.detach() ** 2 * (0.5 + noise)
                old = self.ema.get(key)
                self.ema[key] = new if old is None else (1 - decay) * old + decay * new
        self.n_updates += 1

    def update_preconditioner(self):
        for key, f in self.ema.items():
            self.inv[key] = self._install_if_finite(key, 1.0 / (f + self.config.damping), self.inv.get(key), "inverse")

    def precondition(self):
        for name in self.preconditioned_modules:
            for local, p in self.module_params(name).items():
                inv = self.inv.get(f"{name}.{local}")
                if inv is not None and p.grad is not None:
                    p.grad.mul_(inv)


class OtherNoisyDiag(NoisyDiag):
    pass


# ----------------------------------------------------------------------------------------------
# 5. state dict: bit-for-bit resume
# ----------------------------------------------------------------------------------------------

RESUME_CONFIG = dict(damping=1e-2, ema_decay=0.3, curvature_upd_interval=2, preconditioner_upd_interval=3,
                     preconditioner_warmup_steps=1, seed=1234)


def make_run(seed=0):
    model = mlp(seed)
    gm = NoisyDiag(model, PreconditioningConfig(**RESUME_CONFIG))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, gm, opt


def train(model, gm, opt, data):
    for x, t in data:
        opt.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        gm.forward_and_backward()
        opt.step()


def test_state_dict_round_trip_continues_bit_for_bit():
    data = batches(11, seed=5)
    k = 5
    model, gm, opt = make_run()
    train(model, gm, opt, data)

    model_a, gm_a, opt_a = make_run()
    train(model_a, gm_a, opt_a, data[:k])
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "gm": gm_a.state_dict()}, buffer)
    del model_a, gm_a, opt_a
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model_b, gm_b, opt_b = make_run(seed=99)  # a fresh model with other initial values
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    gm_b.load_state_dict(saved["gm"])
    assert gm_b.step == k and gm_b.n_updates == saved["gm"]["maker_state"]["n_updates"]
    train(model_b, gm_b, opt_b, data[k:])

    assert all_equal(list(model_b.parameters()), list(model.parameters()))
    assert torch.equal(gm_b.generator.get_state(), gm.generator.get_state())
    assert gm_b.ema.keys() == gm.ema.keys() and all(torch.equal(gm_b.ema[n], gm.ema[n]) for n in gm.ema)
    assert gm_b.step == gm.step == len(data)


def test_state_dict_is_a_copy():
    model, gm, opt = make_run()
    train(model, gm, opt, batches(2))
    sd = gm.state_dict()
    key = next(iter(gm.ema))
    sd["maker_state"]["ema"][key].add_(1.0)
    sd["step"] = 100
    assert gm.step == 2 and not torch.equal(sd["maker_state"]["ema"][key], gm.ema[key])


def test_load_state_dict_rejects_other_maker_other_model_and_asdl_dicts():
    model, gm, opt = make_run()
    train(model, gm, opt, batches(2))
    sd = gm.state_dict()
    with pytest.raises(ValueError, match=r"saved by .*\.NoisyDiag and cannot be loaded into .*\.OtherNoisyDiag"):
        OtherNoisyDiag(mlp(), PreconditioningConfig(**RESUME_CONFIG)).load_state_dict(sd)
    wider = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))
    with pytest.raises(ValueError, match=r"another structure .*saved \['0.weight', \[8, 6\]\] vs model \['0.weight', \[9, 6\]\]"):
        NoisyDiag(wider, PreconditioningConfig(**RESUME_CONFIG)).load_state_dict(sd)
    with pytest.raises(ValueError, match="not a curvfun PreconditionedGradientMaker state dict"):
        gm.load_state_dict({"step": 3})
    ignoring = NoisyDiag(mlp(), PreconditioningConfig(**{**RESUME_CONFIG, "ignore_modules": ["2"]}))
    with pytest.raises(ValueError, match="use the same ignore_modules as the saved run"):
        ignoring.load_state_dict(sd)
    other_config = NoisyDiag(mlp(), PreconditioningConfig(**{**RESUME_CONFIG, "damping": 0.5}))
    with pytest.warns(UserWarning, match=r"another config \(fields \['damping'\] differ\)"):
        other_config.load_state_dict(sd)


def test_generator_seeding():
    a = Counting(mlp(), PreconditioningConfig(seed=7))
    b = Counting(mlp(), seed=7)
    c = Counting(mlp(), PreconditioningConfig(seed=1), seed=7)  # the argument wins
    draws = [torch.randn(4, generator=m.generator) for m in (a, b, c)]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    torch.manual_seed(11)
    d = Counting(mlp())
    before = torch.get_rng_state()
    e_seed = Counting(mlp()).seed
    assert torch.equal(before, torch.get_rng_state())  # deriving a seed does not consume the global stream
    torch.manual_seed(11)
    assert Counting(mlp()).seed == d.seed == e_seed


# ----------------------------------------------------------------------------------------------
# 6. module assignment, report, robustness
# ----------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.block1 = nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6))
        self.block10 = nn.Sequential(nn.Linear(6, 6))
        self.conv = nn.Conv1d(1, 1, 3)
        self.out = nn.Linear(6, 10)
        self.out.weight = self.emb.weight  # tied
        self.scale = nn.Parameter(torch.ones(1))  # held by the container itself
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)


def test_assign_modules_by_instance_class_and_substring():
    net = Net()
    a = assign_modules(net, ["block1", nn.LayerNorm])
    assert list(a.preconditioned) == ["conv"]
    assert a.plain["block1.0"] == "ignored by config: name contains 'block1'"
    assert a.plain["block10.0"] == "ignored by config: name contains 'block1'"  # substring, as in ASDL
    assert a.plain["emb"] == "parameter shared with 'out' (tied weights)"
    assert a.plain["out"] == "parameter shared with 'emb' (tied weights)"
    assert "parameters held directly by container" in a.plain["<root>"] and "scale" in a.plain_parameters
    assert "frozen" not in a.plain and "frozen" not in a.preconditioned  # no trainable parameters

    by_instance = assign_modules(net, [net.block1, net.conv], lambda n, m: None)
    assert "block1.0" in by_instance.plain and "block1.1" in by_instance.plain  # a container covers its layers
    assert "block10.0" in by_instance.preconditioned and "conv" in by_instance.plain

    unsupported = assign_modules(net, None, lambda n, m: None if isinstance(m, nn.Linear) else "unsupported")
    assert list(unsupported.preconditioned) == ["block1.0", "block10.0"]
    assert assign_modules(net, ["nomatch", nn.ReLU]).unmatched_ignores == ["nomatch", nn.ReLU]


def test_report_says_once_which_layers_are_preconditioned(caplog):
    net = Net()
    with pytest.warns(UserWarning, match=r"ignore_modules entries \['nomatch'\] match no module"):
        gm = NoisyDiag(net, PreconditioningConfig(ignore_modules=["nomatch"]))
    assert list(gm.preconditioned_modules) == ["block1.0", "block10.0"]
    assert gm.module_name_of(net.block10[0].weight) == ("block10.0", "weight")
    assert gm.module_name_of(net.out.weight) is None  # tied: plain
    assert set(gm.module_params("block1.0")) == {"weight", "bias"}
    with caplog.at_level(logging.INFO, logger="curvfun.precondition"):
        with pytest.warns(UnsupportedModuleWarning, match=r"cannot precondition \['emb', 'block1.1', 'conv'\]"):
            text = gm.report_preconditioned_modules()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert gm.report_preconditioned_modules() == text  # said once
    assert caplog.text.count("preconditioning 2 layer(s): ['block1.0', 'block10.0']") == 1
    assert "conv (unsupported layer class Conv1d)" in text and "out (parameter shared with 'emb'" in text


def test_install_if_finite_keeps_the_last_good_value_and_warns_once():
    model, gm, opt = make_run()
    good = torch.ones(3)
    assert gm._install_if_finite("0", good, None) is good
    bad = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.warns(NonFiniteCurvatureWarning, match=r"new curvature of '0' at step 0 has non-finite.*last good one is kept"):
        assert gm._install_if_finite("0", bad, good) is good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gm._install_if_finite("0", (bad, good), good) is good  # no second warning for '0'
    with pytest.warns(NonFiniteCurvatureWarning, match="no good one exists yet"):
        assert gm._install_if_finite("2", {"A": torch.tensor([math.inf])}, None) is None
    assert gm.nonfinite_counts == {"0": 2, "2": 1}
    assert gm.state_dict()["nonfinite_counts"] == {"0": 2, "2": 1}


def test_nonfinite_curvature_does_not_stop_training():
    model, gm, opt = make_run()
    data = batches(6)
    train(model, gm, opt, data[:2])  # preconditioner refreshed at steps 0, 1, then 4
    good_inv = {k: v.clone() for k, v in gm.inv.items()}
    key = next(iter(gm.ema))
    gm.ema[key] = torch.full_like(gm.ema[key], math.nan)  # the average stays NaN
    with pytest.warns(NonFiniteCurvatureWarning, match=key):
        train(model, gm, opt, data[2:])
    assert torch.equal(gm.inv[key], good_inv[key])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_subclass_must_make_exactly_one_pass():
    class NoPass(Counting):
        def update_curvature(self):
            self.curvature_steps.append(self.step)

    class TwoPasses(Counting):
        def do_forward_and_backward(self, step=None):
            return True

    model = mlp()
    for cls, match in [(NoPass, "made no forward/backward passes at step 0"), (TwoPasses, "made 2 forward/backward")]:
        gm = cls(model)
        y = gm.setup_model_call(model, X)
        gm.setup_loss_call(F.cross_entropy, y, T)
        with pytest.raises(RuntimeError, match=match):
            gm.forward_and_backward()
    with pytest.raises(TypeError, match="abstract"):
        PreconditionedGradientMaker(model)


def test_pure_helpers_evaluate_the_registered_calls_without_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))
    gm = Counting(model)
    y = gm.setup_model_call(lambda inp: {"z": model(inp)}, X)
    gm.setup_loss_call(nn.CrossEntropyLoss(), y["z"], T)
    gm.setup_logits_repr(y["z"])
    running = model[1].running_mean.clone()
    params = {k: v.detach() * 1.5 for k, v in model.named_parameters()}
    out = gm.model_output_at(params)
    assert torch.equal(model[1].running_mean, running)  # buffers were copies
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for p in expected.parameters():
            p.mul_(1.5)
    assert torch.allclose(out["z"], expected(X), rtol=0, atol=1e-12)
    per_sample = gm.loss_from_output(out, reduction="none")
    assert per_sample.shape == (5,) and torch.allclose(per_sample.mean(), gm.loss_from_output(out))
    assert gm._loss_fn.reduction == "mean"  # restored
    assert torch.equal(gm.logits_from_output(out), out["z"])
    Pair = namedtuple("Pair", "a b")
    gm.setup_loss_call(lambda p: F.cross_entropy(p.a, p.b), Pair(y["z"], T))
    with pytest.raises(TypeError, match="has no 'reduction' option"):
        gm.loss_from_output(out, reduction="none")
    assert torch.isfinite(gm.loss_from_output(out))


def test_subclass_can_make_the_pass_functionally_with_the_pure_helpers():
    """update_curvature as pure functions: torch.func.grad_and_value of loss_from_output(model_output_at(p))."""

    class Functional(Counting):
        def update_curvature(self):
            self.curvature_steps.append(self.step)
            params = {k: v.detach() for k, v in self.model.named_parameters()}

            def loss_of(p):
                out = self.model_output_at(p)
                return self.loss_from_output(out), out

            g, (loss, out) = torch.func.grad_and_value(loss_of, has_aux=True)(params)
            for name, p in self.model.named_parameters():
                p.grad = g[name] if p.grad is None else p.grad + g[name]
            self._record_pass(out, loss)

    model = mlp()
    gm = Functional(model, PreconditioningConfig(curvature_upd_interval=2))
    x, t = batches(1)[0]
    want = plain_grads(model, lambda m: F.cross_entropy(m(x), t))
    for step in range(2):  # a functional pass, then a plain one
        model.zero_grad()
        y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, y, t)
        out, loss = gm.forward_and_backward()
        assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(grads(model), want))
        assert torch.allclose(loss, F.cross_entropy(model(x), t)) and torch.allclose(gm.logits, model(x))
    assert gm.curvature_steps == [0]


def test_wrapped_models_are_named_as_the_inner_module():
    inner = mlp()
    a = assign_modules(nn.DataParallel(inner))
    assert list(a.preconditioned) == ["0", "2"]
    gm = Counting(nn.DataParallel(inner))
    assert gm.module_name_of(inner[2].bias) == ("2", "bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_detects_nan_and_inf_and_not_overflowing_sums(dtype):
    """The finiteness check behind "non-finite curvature is not installed": one NaN or ±Inf entry
    anywhere makes a tree non-finite; finite entries whose sum overflows the dtype do not."""
    from curvfun.precondition.base import all_finite

    big = torch.finfo(dtype).max
    x = torch.full((64, 3), big / 2, dtype=dtype)  # finite entries, their sum overflows
    assert all_finite({"a": x, "b": [torch.zeros(0, dtype=dtype), 1.5, None]})
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 2] = bad
        assert not all_finite({"a": torch.ones(2, dtype=dtype), "b": (y,)})
    assert not all_finite([float("nan")])
    assert all_finite(torch.tensor([1 + 2j, 3j]))
    assert not all_finite(torch.tensor([1 + 2j, complex(float("nan"), 0)]))
