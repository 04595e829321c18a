"""Issue 7: K-FAC data-parallel on gloo (CPU), 2 ranks vs 1 process.

K-FAC (fisher_mc, damping 1e-3) on the reference MLP of ``common.py``, batch 128 per rank,
preconditioner/curvature interval 1 and 10. Each configuration runs WARMUP + REPEAT steps;
time per step is the median over the REPEAT steps (rank 0's clock for 2 ranks); bytes are the
payloads counted by ``curvfun.distributed.BYTES`` per step, by category, averaged over the
REPEAT steps. Every process uses 1 thread (2 ranks fill the 2 cores). The machine is shared:
absolute times are noisy, compare ratios within one run.

Run: ``python benchmarks/run.py distributed`` (or this file directly).
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import batch, mlp, setup, table  # noqa: E402

WARMUP, REPEAT, N = 3, 10, 128


def _run(interval: int, mode: str, n: int) -> dict:
    from curvfun import distributed as cfd
    from curvfun.precondition import KfacGradientMaker, PreconditioningConfig

    setup(threads=1, seed=0)
    model = mlp()
    torch.manual_seed(1 + cfd.rank())
    data = [batch("mlp", n) for _ in range(4)]
    cfg = PreconditioningConfig(damping=1e-3, preconditioner_upd_interval=interval)
    gm = KfacGradientMaker(model, cfg, fisher_type="fisher_mc", inverse_mode=mode)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    times, nbytes = [], {}
    for t in range(WARMUP + REPEAT):
        x, y = data[t % len(data)]
        cfd.reset_counts()
        t0 = time.perf_counter()
        opt.zero_grad()
        dy = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dy, y)
        gm.forward_and_backward()
        opt.step()
        if cfd.is_distributed():
            dist.barrier()  # the step ends when every rank has finished it
        if t >= WARMUP:
            times.append(time.perf_counter() - t0)
            for k, v in cfd.BYTES.items():
                nbytes[k] = nbytes.get(k, 0) + v / REPEAT
    return {"sec": statistics.median(times), "bytes": nbytes}


def _worker(rank: int, world: int, init: str, out: str, configs: list) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    res = {c: _run(*c) for c in configs}
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


def _two_ranks(configs: list) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        ctx = mp.get_context("spawn")
        ps = [ctx.Process(target=_worker, args=(r, 2, os.path.join(d, "init"), out, configs)) for r in range(2)]
        for p in ps:
            p.start()
        for p in ps:
            p.join(600)
        if any(p.exitcode != 0 for p in ps):
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in ps]}")
        return torch.load(out)


def _fmt_bytes(b: dict) -> str:
    return ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(b.items())) or "none"


def main() -> None:
    configs = [(i, m, N) for i in (1, 10) for m in ("assigned", "replicated")]
    two = _two_ranks(configs)
    for interval in (1, 10):
        one = _run(interval, "replicated", N)
        one_big = _run(interval, "replicated", 2 * N)
        rows = [
            (f"1 process, batch {N}", one["sec"], 1.0),
            (f"1 process, batch {2 * N}", one_big["sec"], one_big["sec"] / one["sec"]),
        ]
        for mode in ("assigned", "replicated"):
            r = two[(interval, mode, N)]
            rows.append((f"2 gloo ranks x {N}, inverses {mode}", r["sec"], r["sec"] / one["sec"]))
        table(f"K-FAC on the MLP, interval {interval}: time per step (1 thread per process; shared machine, noisy)",
              rows)
        for mode in ("assigned", "replicated"):
            print(f"  bytes per step, 2 ranks, {mode:<10}: {_fmt_bytes(two[(interval, mode, N)]['bytes'])} (rank 0's payloads)")


if __name__ == "__main__":
    main()
