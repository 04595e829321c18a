"""The natural-gradient makers' state (issue 5, "Must show"): refresh schedules with a real maker,
and save / resume bit-for-bit for every maker.

Schedules: ``update_curvature`` / ``update_preconditioner`` are wrapped on the maker instance and
the steps on which they run are compared with step sets written out by hand below (derived from
the rule documented in ``curvfun.precondition.config``, never by calling the schedule functions).
Resume: three state dicts (model, maker, optimizer) go through ``torch.save`` /
``torch.load(weights_only=True)`` into a fresh model, maker and optimizer; the continued run's
parameters must be ``torch.equal`` to an uninterrupted run's.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvfun.precondition import KfacGradientMaker, PreconditioningConfig, UnsupportedModuleWarning
from test_natural_gradient import MAKERS, kfac_expected, linear_factors, maker_step, plain_grad



# unit-wise makers leave Linear layers plain and say so; tests that check the warning record it

pytestmark = [pytest.mark.filterwarnings("ignore::curvfun.precondition.UnsupportedModuleWarning"), pytest.mark.usefixtures("one_thread")]


def model_fn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def batches(n: int, bs: int = 6):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(bs, 4, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def new_maker(kind, model, config, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedModuleWarning)  # unit-wise: Linear layers stay plain
        if kind == "lowrank":
            kw.setdefault("rank", 4)
        return MAKERS[kind](model, config, **kw)


# ==============================================================================================
# schedules
# ==============================================================================================


def refresh_steps(config: PreconditioningConfig, steps: int, kind: str = "kfac"):
    """Run ``steps`` README steps with a real maker; the steps at which update_curvature /
    update_preconditioner ran (wrapped on the instance)."""
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gm = new_maker(kind, model, config, seed=0)
    seen = {"curvature": [], "preconditioner": []}
    for what in seen:
        original = getattr(gm, f"update_{what}")

        def wrapped(original=original, what=what):
            seen[what].append(gm.step)
            return original()

        setattr(gm, f"update_{what}", wrapped)
    data = batches(steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ratio mode: "past num_total_steps"
        for x, t in data:
            opt.zero_grad()
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, t)
            gm.forward_and_backward()
            opt.step()
    assert gm.step == steps
    return seen["curvature"], seen["preconditioner"]


# Hand-derived from the documented rule: warm-up steps 0..W-1 all refresh; then p_0 = W and
# p_{j+1} = p_j + interval_at(p_j). Curvature follows the preconditioner unless it has its own.
SCHEDULES = {
    # interval 3, no warm-up
    "interval3": (dict(preconditioner_upd_interval=3), 14, [0, 3, 6, 9, 12], [0, 3, 6, 9, 12]),
    # warm-up 2 then interval 3: 0, 1 | 2, 5, 8, 11
    "warmup2_interval3": (
        dict(preconditioner_upd_interval=3, preconditioner_warmup_steps=2), 13,
        [0, 1, 2, 5, 8, 11], [0, 1, 2, 5, 8, 11],
    ),
    # curvature on its own schedule: warm-up 3 then every 2nd step; preconditioner every 4th
    "own_curvature": (
        dict(preconditioner_upd_interval=4, curvature_upd_interval=2, curvature_warmup_steps=3), 12,
        [0, 1, 2, 3, 5, 7, 9, 11], [0, 4, 8],
    ),
    # 'step': interval 1, doubled at milestones 4 and 10: 0 1 2 3 4 | +2: 6 8 10 | +4: 14 18
    "step_type": (
        dict(preconditioner_interval_type="step", preconditioner_upd_interval=1,
             preconditioner_interval_milestones=(4, 10)), 20,
        [0, 1, 2, 3, 4, 6, 8, 10, 14, 18], [0, 1, 2, 3, 4, 6, 8, 10, 14, 18],
    ),
    # 'step' for the curvature only: interval 1, x3 from step 3 on; preconditioner every 2nd step
    "curvature_step_type": (
        dict(preconditioner_upd_interval=2, curvature_upd_interval=1, curvature_interval_type="step",
             curvature_interval_milestones=(3,), curvature_interval_factor=3.0), 13,
        [0, 1, 2, 3, 6, 9, 12], [0, 2, 4, 6, 8, 10, 12],
    ),
    # 'linear': interval round(1 + 4·min(1, s/20)) at refresh s (T = 20, final interval 5):
    # s=0,1,2 -> 1; s=3 -> round(1.6)=2; 5 -> 2; 7 -> round(2.4)=2; 9 -> round(2.8)=3; 12 -> round(3.4)=3;
    # 15 -> 4; 19 -> round(4.8)=5; 24 -> 5; 29
    "linear_type": (
        dict(num_total_steps=20, preconditioner_interval_type="linear", preconditioner_upd_interval=1,
             preconditioner_final_interval=5), 30,
        [0, 1, 2, 3, 5, 7, 9, 12, 15, 19, 24, 29], [0, 1, 2, 3, 5, 7, 9, 12, 15, 19, 24, 29],
    ),
    # ratio mode (ASDL): T = 20, U = int(20·0.25) = 5 refreshes, W = int(20·0.1) = 2 warm-up steps,
    # I0 = (20-2)//(5-2) = 6: 0 1 | 2 8 14; none at or after T
    "ratio": (
        dict(num_total_steps=20, preconditioner_upd_ratio=0.25, preconditioner_warmup_ratio=0.1), 24,
        [0, 1, 2, 8, 14], [0, 1, 2, 8, 14],
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_refreshes_happen_on_exactly_the_configured_steps(name):
    fields, steps, curvature, preconditioner = SCHEDULES[name]
    got_c, got_p = refresh_steps(PreconditioningConfig(damping=0.05, **fields), steps)
    assert got_c == curvature
    assert got_p == preconditioner


@pytest.mark.parametrize("kind", ["ekfac", "diag", "full"])
def test_schedule_applies_to_other_makers(kind):
    """The same rule with other makers (warm-up 2 then interval 3)."""
    cfg = PreconditioningConfig(damping=0.05, preconditioner_upd_interval=3, preconditioner_warmup_steps=2)
    got_c, got_p = refresh_steps(cfg, 9, kind)
    assert got_c == got_p == [0, 1, 2, 5, 8]


def test_between_refreshes_the_last_inverse_preconditions_new_gradients():
    """Interval 3, K-FAC (empirical Fisher): steps 1 and 2 precondition their own gradients with the
    inverse built at step 0 from batch 0 at step 0's parameters; step 3 builds a new one."""
    lam = 0.05
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # Linear layers only
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gm = KfacGradientMaker(model, PreconditioningConfig(damping=lam, preconditioner_upd_interval=3), fisher_type="fisher_emp")
    data = batches(4)
    factors0 = linear_factors(model, *data[0], "fisher_emp")
    snapshot0 = copy.deepcopy(model)
    maker_step(gm, model, *data[0])
    opt.step()
    for s in (1, 2):
        g = plain_grad(model, *data[s])
        expected = kfac_expected(snapshot0, factors0, g, lam)
        torch.testing.assert_close(maker_step(gm, model, *data[s]), expected, rtol=1e-9, atol=1e-11)
        opt.step()
    g = plain_grad(model, *data[3])
    expected = kfac_expected(model, linear_factors(model, *data[3], "fisher_emp"), g, lam)
    torch.testing.assert_close(maker_step(gm, model, *data[3]), expected, rtol=1e-9, atol=1e-11)


# ==============================================================================================
# save / resume
# ==============================================================================================


def _config(kind, ema):
    return PreconditioningConfig(damping=0.05, preconditioner_upd_interval=2, ema_decay=ema)


def _train(model, opt, gm, data):
    for x, t in data:
        opt.zero_grad()
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy_y, t)
        gm.forward_and_backward()
        opt.step()


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


CASES = [(k, ema) for k in MAKERS for ema in (-1, 0.5) if not (k == "lowrank" and ema != -1)]


@pytest.mark.parametrize("kind,ema", CASES, ids=[f"{k}-ema{e}" for k, e in CASES])
def test_save_load_continue_is_bit_for_bit(kind, ema):
    """k = 3 steps, save (model, maker, optimizer) through torch.save / torch.load(weights_only=True),
    load into a fresh model (other init), a fresh maker (other MC seed) and a fresh optimizer,
    4 more steps: parameters torch.equal to 7 uninterrupted steps. Default fisher_type (MC): the
    generator state is part of the maker state. Interval 2 and EMA make the loaded curvature and
    inverses matter (step 3 uses the saved inverse; step 4 blends the saved curvature)."""
    data = batches(7)

    model = model_fn(0)
    opt = _opt(model)
    gm = new_maker(kind, model, _config(kind, ema), seed=0)
    _train(model, opt, gm, data)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = model_fn(0)
    opt = _opt(model)
    gm = new_maker(kind, model, _config(kind, ema), seed=0)
    _train(model, opt, gm, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "maker": gm.state_dict(), "optimizer": opt.state_dict()}, buf)
    del model, opt, gm
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model = model_fn(99)
    opt = _opt(model)
    gm = new_maker(kind, model, _config(kind, ema), seed=12345)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    gm.load_state_dict(saved["maker"])
    assert gm.step == 3
    _train(model, opt, gm, data[3:])
    resumed = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed))

    # and the maker state is what makes it so: without it the continuation differs
    model = model_fn(99)
    opt = _opt(model)
    gm = new_maker(kind, model, _config(kind, ema), seed=12345)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    gm.state["step"] = 3
    _train(model, opt, gm, data[3:])
    assert not all(torch.equal(a, p) for a, p in zip(uninterrupted, model.parameters()))
