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


def _run(interval: int, mode: str, n: int, device: str = "cpu") -> dict:
    from curvfun import distributed as cfd
    from curvfun.precondition import KfacGradientMaker, PreconditioningConfig

    setup(threads=1, seed=0)
    model = mlp().to(device)
    torch.manual_seed(1 + cfd.rank())
    data = [tuple(t.to(device) for t in batch("mlp", n)) for _ in range(4)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    cfg = PreconditioningConfig(damping=1e-3, preconditioner_upd_interval=interval)
    # dense factors in every configuration: under torch.distributed the data-space route is off,
    # so the single-process baseline uses the same algorithm (data_space="never")
    gm = KfacGradientMaker(model, cfg, fisher_type="fisher_mc", inverse_mode=mode, data_space="never")
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
        sync()
        if cfd.is_distributed():
            dist.barrier()  # the step ends when every rank has finished it
        if t >= WARMUP:
            times.append(time.perf_counter() - t0)
            for k, v in cfd.BYTES.items():
                nbytes[k] = nbytes.get(k, 0) + v / REPEAT
    return {"sec": statistics.median(times), "bytes": nbytes}


def _worker(rank: int, world: int, init: str, out: str, configs: list, backend: str = "gloo") -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    device = f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
    res = {c: _run(*c, device=device) for c in configs}
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


def _ranks(configs: list, world: int = 2, backend: str = "gloo") -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.pt")
        ctx = mp.get_context("spawn")
        ps = [ctx.Process(target=_worker, args=(r, world, os.path.join(d, "init"), out, configs, backend))
              for r in range(world)]
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
    two = _ranks(configs)
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


def main_nccl() -> None:
    """NCCL on every visible GPU (one rank each) versus one process on one GPU with no process
    group. With a single GPU this is a world of 1: it measures what the process group and its
    collectives add to a step, not scaling."""
    world = int(sys.argv[sys.argv.index("--world") + 1]) if "--world" in sys.argv else torch.cuda.device_count()
    configs = [(i, m, N) for i in (1, 10) for m in ("assigned", "replicated")]
    ranks = _ranks(configs, world=world, backend="nccl")
    for interval in (1, 10):
        one = _run(interval, "replicated", N, device="cuda")
        rows = [(f"1 process on cuda, batch {N}, no process group", one["sec"], 1.0)]
        for mode in ("assigned", "replicated"):
            r = ranks[(interval, mode, N)]
            rows.append((f"{world} NCCL rank(s) x {N}, inverses {mode}", r["sec"], r["sec"] / one["sec"]))
        table(f"K-FAC on the MLP, interval {interval}, {torch.cuda.get_device_name()}: time per step", rows)
        for mode in ("assigned", "replicated"):
            print(f"  bytes per step, {world} rank(s), {mode:<10}: {_fmt_bytes(ranks[(interval, mode, N)]['bytes'])}")


if __name__ == "__main__":
    if "--nccl" in sys.argv:
        main_nccl()
    else:
        main()
