"""Data-parallel preconditioning on torch.distributed (issue 7), gloo on CPU.

One spawned job per world size (2 and 3) runs every scenario and writes its results to a file;
the parent trains the same scenarios in one process on the concatenated batch and compares
(float64, 1e-6). Scenarios: K-FAC (fisher_emp, so no MC randomness differs), EKFAC, layer-wise
(rows gathered), Shampoo, low-rank K-FAC (power iteration on rows split over ranks), each with
inverse_mode "assigned" and "replicated", plain and DDP-wrapped; AdaFisher(dist=True) and the plain
GradientMaker, plain and DDP-wrapped. Unequal per-rank batches (world size 2, 3 + 5 samples):
the makers' weighted means equal the concatenated batch. Also: collectives counted per step
(none of category "curvature"/"inverse" between refreshes), a rank killed mid-run (the others
raise CurvfunDistributedError naming rank and step within the process-group timeout), a model
structure mismatch detected at construction on every rank. Makers without a curvature reduction
(PSGD, K-BFGS, SENG, SMW, Newton, CurveBall) precondition with each rank's own curvature and
average the result: the ranks stay identical, plain and DDP-wrapped.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from curvfun import distributed as cfd
from curvfun.optim import AdaFisher
from curvfun.precondition import (
    CurveBallGradientMaker,
    EkfacGradientMaker,
    GradientMaker,
    KronBfgsGradientMaker,
    KronPsgdGradientMaker,
    NewtonGradientMaker,
    SengGradientMaker,
    SmwEmpNaturalGradientMaker,
    KfacGradientMaker,
    LayerWiseNaturalGradientMaker,
    LowRankKfacGradientMaker,
    PreconditioningConfig,
    ShampooGradientMaker,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

TIMEOUT_S = 20  # the process group's timeout
N_PER_RANK = 4
STEPS = 5
KILL_STEP = 2

# (method, inverse_mode, ddp)
SCENARIOS = [
    (m, mode, ddp)
    for m in ("kfac", "shampoo", "ekfac", "layerwise", "lowrank")
    for mode in ("assigned", "replicated")
    for ddp in (False, True)
    if not (m in ("ekfac", "layerwise") and ddp)
] + [("adafisher", None, False), ("adafisher", None, True), ("plain", None, False), ("plain", None, True)]
#: per-rank batch sizes of the unequal-batch job (world size 2) and the makers it runs
UNEQUAL = (3, 5)
UNEQUAL_SCENARIOS = [("kfac", "assigned", False), ("kfac", "replicated", True), ("ekfac", "assigned", False),
                     ("layerwise", "assigned", False), ("lowrank", "assigned", False), ("lowrank", "replicated", True),
                     ("plain", None, True)]
LOWRANK_ITERS = 3


def _model(hidden: int = 5, norm: bool = False) -> nn.Module:
    """The MLP 6-5-3; with ``norm`` a LayerNorm after the first layer (low-rank K-FAC gives it a
    K-FAC factor, averaged and inverted by ``inverse_mode``)."""
    torch.manual_seed(0)
    mid = [nn.LayerNorm(hidden)] if norm else []
    return nn.Sequential(nn.Linear(6, hidden), *mid, nn.Tanh(), nn.Linear(hidden, 3))


def _data(step: int, world: int, sizes: tuple[int, ...] | None = None):
    """This rank's part of step ``step``'s batch of ``sum(sizes)`` samples (default ``world ·
    N_PER_RANK``; the whole batch in one process): rank r gets the r-th contiguous slice."""
    sizes = sizes or (N_PER_RANK,) * world
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    if cfd.is_distributed():
        r = cfd.rank()
        lo = sum(sizes[:r])
        return x[lo:lo + sizes[r]], y[lo:lo + sizes[r]]
    return x, y


def _maker(method: str, model: nn.Module, mode: str, interval: int):
    cfg = PreconditioningConfig(damping=1e-2, preconditioner_upd_interval=interval,
                                ema_decay=-1 if method in ("layerwise", "lowrank") else 0.5)
    if method == "plain":
        return GradientMaker(model)
    if method == "kfac":
        return KfacGradientMaker(model, cfg, fisher_type="fisher_emp", inverse_mode=mode)
    if method == "ekfac":
        return EkfacGradientMaker(model, cfg, fisher_type="fisher_emp", inverse_mode=mode)
    if method == "layerwise":
        return LayerWiseNaturalGradientMaker(model, cfg, fisher_type="fisher_emp", inverse_mode=mode)
    if method == "lowrank":  # rank 2 < every factor dimension: a truncation, not dense K-FAC
        return LowRankKfacGradientMaker(model, cfg, rank=2, power_iters=LOWRANK_ITERS, fisher_type="fisher_emp",
                                        inverse_mode=mode)
    if method == "shampoo":
        return ShampooGradientMaker(model, PreconditioningConfig(damping=1e-3, preconditioner_upd_interval=interval),
                                    inverse_mode=mode)
    raise ValueError(method)


LOCAL_MAKERS = {
    "psgd": lambda m: KronPsgdGradientMaker(m, PreconditioningConfig(damping=1e-2)),
    "kbfgs": lambda m: KronBfgsGradientMaker(m, PreconditioningConfig(damping=1e-2)),
    "seng": lambda m: SengGradientMaker(m, PreconditioningConfig(damping=1e-2), sketching_size=4, truncated_rank=2),
    "smw": lambda m: SmwEmpNaturalGradientMaker(m, PreconditioningConfig(damping=1e-2)),
    "newton": lambda m: NewtonGradientMaker(m, PreconditioningConfig(damping=1.0)),
    "curveball": lambda m: CurveBallGradientMaker(m, PreconditioningConfig(damping=1e-2)),
}


def _job_local(world: int) -> dict:
    """Each local-curvature maker, plain and DDP: the final parameters after 3 steps."""
    out = {}
    for name, make in LOCAL_MAKERS.items():
        for ddp in (False, True):
            model = _model()
            wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
            gm = make(wrapped)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for t in range(3):
                x, y = _data(t, world)
                opt.zero_grad()
                dy = gm.setup_model_call(wrapped, x)
                gm.setup_loss_call(F.cross_entropy, dy, y)
                gm.forward_and_backward()
                opt.step()
            out[(name, ddp)] = [p.detach().clone() for p in model.parameters()]
    return out


def _train(method: str, mode: str | None, ddp: bool, world: int, steps: int = STEPS, interval: int = 2,
           kill_at: int | None = None, sizes: tuple[int, ...] | None = None):
    """Train ``steps`` steps; returns the final parameters and the collective counts per step."""
    model = _model(norm=method == "lowrank")
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp else model
    counts = []
    if method == "adafisher":
        opt = AdaFisher(wrapped, lr=0.05, TCov=interval, dist=cfd.is_distributed())
        for t in range(steps):
            cfd.reset_counts()
            x, y = _data(t, world, sizes)
            opt.zero_grad()
            F.cross_entropy(wrapped(x), y).backward()
            opt.step()
            counts.append(dict(cfd.COUNTS))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gm = _maker(method, wrapped, mode, interval)
        for t in range(steps):
            if kill_at is not None and t == kill_at and cfd.rank() == 1:
                os._exit(1)
            cfd.reset_counts()
            x, y = _data(t, world, sizes)
            opt.zero_grad()
            dy = gm.setup_model_call(wrapped, x)
            gm.setup_loss_call(F.cross_entropy, dy, y)
            gm.forward_and_backward()
            opt.step()
            counts.append(dict(cfd.COUNTS))
    return [p.detach().clone() for p in model.parameters()], counts


def _job_main(world: int) -> dict:
    out = {"runs": {}, "counts": {}}
    for sc in SCENARIOS:
        out["runs"][sc] = _train(*sc, world=world)[0]
    for sc in (("kfac", "assigned", False), ("kfac", "replicated", True), ("shampoo", "assigned", False),
               ("adafisher", None, False), ("lowrank", "assigned", False), ("lowrank", "replicated", True)):
        out["counts"][sc] = _train(*sc, world=world, steps=6, interval=3)[1]
    if world == 2:
        out["unequal"] = {sc: _train(*sc, world=world, sizes=UNEQUAL)[0] for sc in UNEQUAL_SCENARIOS}
    # structure mismatch: rank 1 builds another hidden width
    try:
        KfacGradientMaker(_model(4 if cfd.rank() == 1 else 5), fisher_type="fisher_emp")
        out["mismatch"] = None
    except cfd.CurvfunDistributedError as e:
        out["mismatch"] = str(e)
    return out


def _job_kill(world: int) -> dict:
    t0 = time.monotonic()
    try:
        _train("kfac", "assigned", False, world, steps=STEPS, interval=1, kill_at=KILL_STEP)
        return {"error": None}
    except cfd.CurvfunDistributedError as e:
        return {"error": str(e), "elapsed": time.monotonic() - t0}


def _worker(rank: int, world: int, init_file: str, out_dir: str, job: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        res = {"main": _job_main, "kill": _job_kill, "local": _job_local}[job](world)
    except BaseException:  # report, never hang the parent
        res = {"crash": traceback.format_exc()}
    torch.save(res, os.path.join(out_dir, f"{job}_rank{rank}.pt"))
    os._exit(0)  # no process-group teardown: a dead peer must not make it wait


def _spawn(tmp_path, world: int, job: str, limit_s: float = 150.0) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    init = str(tmp_path / f"init_{job}_{world}")
    procs = [ctx.Process(target=_worker, args=(r, world, init, str(tmp_path), job)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in alive:
        procs[i].kill()
        procs[i].join()
    assert not alive, f"ranks {alive} of the {job!r} job still ran after {limit_s} s (a hang)"
    res = {}
    for r in range(world):
        path = tmp_path / f"{job}_rank{r}.pt"
        if path.exists():
            res[r] = torch.load(path, weights_only=False)
    return res


_CACHE: dict = {}


@pytest.fixture(scope="module")
def main_results(tmp_path_factory):
    return {w: _spawn(tmp_path_factory.mktemp(f"w{w}"), w, "main") for w in (2, 3)}


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_training_equals_single_process_on_concatenated_batch(main_results, world):
    res = main_results[world]
    assert sorted(res) == list(range(world))
    for r in res.values():
        assert "crash" not in r, r.get("crash")
    bad = []
    for sc in SCENARIOS:
        ref = _train(sc[0], sc[1], False, world)[0]
        for r in range(world):
            got = res[r]["runs"][sc]
            err = max(float((a - b).abs().max()) for a, b in zip(got, ref))
            init = _model(norm=sc[0] == "lowrank").parameters()
            moved = max(float((a - b.detach()).abs().max()) for a, b in zip(ref, init))
            assert moved > 1e-3  # training did something
            if not err <= 1e-6:
                bad.append((sc, r, err))
    assert not bad, f"distributed != single-process on the concatenated batch: {bad}"


@pytest.mark.parametrize("world", [2, 3])
def test_collectives_only_on_refresh_steps(main_results, world):
    """Interval 3 over 6 steps: refresh at steps 0 and 3. Between refreshes: no curvature and no
    inverse collective; the gradient all-reduce on every step unless DDP averaged."""
    for r, res in main_results[world].items():
        counts = res["counts"]
        for step, c in enumerate(counts[("kfac", "assigned", False)]):
            refresh = step % 3 == 0
            assert c.get("grad", 0) == 1
            assert c.get("curvature", 0) == (1 if refresh else 0), (step, c)
            # one broadcast per owning rank (3 layers of different cost -> min(world, 2) owners)
            assert (c.get("inverse", 0) > 0) == refresh and c.get("inverse", 0) <= world, (step, c)
        for step, c in enumerate(counts[("kfac", "replicated", True)]):
            assert c.get("grad", 0) == 0  # DDP averaged in backward
            assert c.get("curvature", 0) == (1 if step % 3 == 0 else 0) and c.get("inverse", 0) == 0, (step, c)
        for step, c in enumerate(counts[("shampoo", "assigned", False)]):
            # statistics come from the averaged gradient: never reduced; roots broadcast on refreshes
            assert c.get("grad", 0) == 1 and c.get("curvature", 0) == 0
            assert (c.get("inverse", 0) > 0) == (step % 3 == 0), (step, c)
        for step, c in enumerate(counts[("adafisher", None, False)]):
            assert c == ({"grad": 1, "curvature": 1} if step % 3 == 0 else {"grad": 1}), (step, c)
        for step, c in enumerate(counts[("lowrank", "assigned", False)]):
            # no rows gathered: the statistics, one all-reduce per power-iteration step, and the
            # LayerNorm's K-FAC factor; its inverse broadcast from its owner
            refresh = {"grad": 1, "curvature": LOWRANK_ITERS + 2, "inverse": 1}
            assert c == (refresh if step % 3 == 0 else {"grad": 1}), (step, c)
        for step, c in enumerate(counts[("lowrank", "replicated", True)]):
            # DDP: the gradient in backward, plus the one-number sample-count all-reduce per step
            refresh = {"batch": 1, "curvature": LOWRANK_ITERS + 2}
            assert c == (refresh if step % 3 == 0 else {"batch": 1}), (step, c)
        for c in counts[("kfac", "replicated", True)]:
            assert c.get("batch", 0) == 1, c


@pytest.mark.parametrize("world", [2, 3])
def test_structure_mismatch_detected_at_construction_on_every_rank(main_results, world):
    for r, res in main_results[world].items():
        msg = res["mismatch"]
        assert msg is not None, f"rank {r} built the maker despite a different model"
        assert f"rank {r}:" in msg and "differs between ranks" in msg and "ranks [1]" in msg


def test_unequal_batches_equal_single_process_on_concatenated_batch(main_results):
    """World size 2 with 3 and 5 samples: gradients and curvature are sample-weighted means over
    ranks (an unweighted mean of the per-rank means would weight rank 0's samples 5/3 as much)."""
    res = main_results[2]
    bad = []
    for sc in UNEQUAL_SCENARIOS:
        ref = _train(sc[0], sc[1], False, 1, sizes=UNEQUAL)[0]
        for r in range(2):
            assert "crash" not in res[r], res[r].get("crash")
            got = res[r]["unequal"][sc]
            err = max(float((a - b).abs().max()) for a, b in zip(got, ref))
            if not err <= 1e-6:
                bad.append((sc, r, err))
    assert not bad, f"unequal per-rank batches != single process on the concatenated batch: {bad}"


def test_unweighted_mean_would_differ_on_unequal_batches():
    """The unequal-batch test can fail: the mean of the per-rank mean gradients (3 + 5 samples)
    is not the concatenated batch's mean gradient."""
    model = _model()
    x, y = _data(0, 1, UNEQUAL)
    grad = lambda xs, ys: torch.autograd.grad(F.cross_entropy(model(xs), ys), list(model.parameters()))  # noqa: E731
    full = grad(x, y)
    parts = [grad(x[:3], y[:3]), grad(x[3:], y[3:])]
    unweighted = [(a + b) / 2 for a, b in zip(*parts)]
    weighted = [(3 * a + 5 * b) / 8 for a, b in zip(*parts)]
    assert max(float((u - f).abs().max()) for u, f in zip(unweighted, full)) > 1e-3
    assert max(float((w - f).abs().max()) for w, f in zip(weighted, full)) < 1e-12


def test_killed_rank_ends_the_others_with_rank_and_step(tmp_path):
    world = 3
    t0 = time.monotonic()
    res = _spawn(tmp_path, world, "kill", limit_s=90.0)
    assert 1 not in res  # rank 1 died
    assert sorted(res) == [0, 2]
    for r, out in res.items():
        assert "crash" not in out, out.get("crash")
        msg = out["error"]
        assert msg is not None, f"rank {r} finished although rank 1 died"
        assert msg.startswith(f"rank {r} of {world}:") and f"at step {KILL_STEP}" in msg, msg
        assert out["elapsed"] < TIMEOUT_S + 15, out
    assert time.monotonic() - t0 < 90


def test_single_process_is_unchanged_and_sends_nothing():
    cfd.reset_counts()
    params, counts = _train("kfac", "assigned", False, 1, steps=2)
    assert all(c == {} for c in counts)
    assert cfd.owners_for("assigned", {"a": 1.0}) is None
    with pytest.raises(ValueError, match="inverse_mode"):
        KfacGradientMaker(_model(), inverse_mode="everywhere")


def test_assign_by_cost_is_greedy_largest_first():
    costs = {"a": 8.0, "b": 7.0, "c": 6.0, "d": 5.0, "e": 4.0}
    owners = cfd.assign_by_cost(costs, 2)
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}
    assert cfd.inverse_cost(torch.zeros(3, 3)) == 27 and cfd.inverse_cost(torch.zeros(2, 4, 4)) == 128


def test_local_curvature_makers_keep_the_ranks_identical(tmp_path):
    """PSGD, K-BFGS, SENG, SMW, Newton and CurveBall have no curvature reduction: each rank
    preconditions with its own batch's curvature and the preconditioned gradients are averaged, so
    every rank takes the same step (plain and DDP-wrapped; DDP's hooks do not see the gradients
    these makers write themselves, so the maker averages them)."""
    res = _spawn(tmp_path, 2, "local")
    assert sorted(res) == [0, 1]
    for r in res.values():
        assert "crash" not in r, r.get("crash")
    init = [p.detach() for p in _model().parameters()]
    for key in res[0]:
        for p0, p1, p_init in zip(res[0][key], res[1][key], init):
            assert torch.equal(p0, p1), f"{key}: the ranks' parameters differ"
            assert torch.isfinite(p0).all() and not torch.equal(p0, p_init), key
