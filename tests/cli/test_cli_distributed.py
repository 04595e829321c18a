"""The ``curvfun`` command data-parallel: two gloo ranks launched by torchrun
(``python -m torch.distributed.run --standalone``) on tiny digits runs, compared with one
process on the same global batches; and the launcher's bad-input errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import curvfun
from curvfun.__main__ import main

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

SRC = os.path.dirname(os.path.dirname(os.path.abspath(curvfun.__file__)))
TINY = ["--steps", "4", "--batch-size", "16", "--eval-every", "2", "--no-progress", "--no-plots", "--threads", "1",
        "--mem-probe-steps", "0", "--train-eval-size", "64", "--test-eval-size", "64", "--model-arg", "hidden=[16]"]
EMP = ["--hp", "kfac.fisher_type=\"fisher_emp\"", "--hp", "lowrank_kfac.fisher_type=\"fisher_emp\""]


def _torchrun(args, timeout=120):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "curvfun", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for r in rows:
        out.setdefault(r["optimizer"], []).append(
            (int(r["step"]), float(r["batch_loss"] or "nan"), float(r["train_loss"] or "nan")))
    return out


def _close(a, b):
    return all((x != x and y != y) or abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b))


def test_two_ranks_follow_the_single_process_run(tmp_path, capsys):
    """compare (makers average the gradients) and train --ddp: the batch losses and evaluations of
    rank 0 equal one process on the same global batches (float32); only rank 0 prints and writes."""
    dp, single = tmp_path / "dp", tmp_path / "single"
    opts = ["--optimizers", "sgd,kfac,lowrank_kfac"]
    proc = _torchrun(["compare", *opts, *TINY, *EMP, "--out", str(dp)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("curvfun compare:") == 1 and "2 ranks (gloo, 8 samples per rank)" in proc.stdout
    assert proc.stdout.count("final train loss") == 1 and proc.stdout.count("run folder:") == 1  # rank 1 printed nothing
    assert sorted(os.listdir(dp)) == ["config.yaml", "metrics.csv", "results.json", "results.md"]
    assert main(["compare", *opts, *TINY, *EMP, "--out", str(single)]) == 0
    capsys.readouterr()
    got, ref = _losses(dp), _losses(single)
    assert list(got) == ["sgd", "kfac", "lowrank_kfac"]
    for name in got:
        assert [r[0] for r in got[name]] == list(range(5))
        for (_, bl, tl), (_, bl_ref, tl_ref) in zip(got[name], ref[name]):
            assert _close([bl, tl], [bl_ref, tl_ref]), (name, got[name], ref[name])
        assert ref[name][-1][1] < ref[name][1][1]  # the loss went down: a real comparison
    assert [r["status"] for r in json.loads((dp / "results.json").read_text())] == ["ok"] * 3

    # DDP-wrapped, train with a checkpoint: rank 0's final parameters equal the single run's
    dp, single = tmp_path / "ddp", tmp_path / "single_train"
    args = ["train", "--optimizer", "kfac", *TINY, "--hp", "fisher_type=\"fisher_emp\"", "--checkpoint-every", "4"]
    proc = _torchrun([*args, "--ddp", "--out", str(dp)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("curvfun train:") == 1 and "DDP" in proc.stdout
    assert main([*args, "--out", str(single)]) == 0
    capsys.readouterr()
    a = torch.load(dp / "checkpoints" / "step_000004.pt", weights_only=False)["model"]
    b = torch.load(single / "checkpoints" / "step_000004.pt", weights_only=False)["model"]
    assert list(a) == list(b)  # saved unwrapped (no "module." prefix)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert _close([r[1] for r in _losses(dp)["kfac"]][1:], [r[1] for r in _losses(single)["kfac"]][1:])


def test_each_rank_trains_on_its_own_slice_of_the_global_batch(monkeypatch):
    """The training loop hands rank r rows [8r, 8r + 8) of the single process's batch of 16 (the
    launched runs cannot tell: every rank training on the whole batch gives the same averages)."""
    from curvfun import distributed as cfd
    from curvfun.cli import config as C
    from curvfun.cli import train as T
    from curvfun.cli.data import load_digits_data

    torch.set_default_dtype(torch.float32)  # as the command runs (conftest restores float64)
    data = load_digits_data()
    cfg = C.build_config(flag_values=dict(steps=3, batch_size=16, mem_probe_steps=0, progress=False,
                                          eval_every=100, train_eval_size=16, test_eval_size=16))
    seen: dict[int, list] = {}
    for r in range(2):
        monkeypatch.setattr(cfd, "is_distributed", lambda: True)
        monkeypatch.setattr(cfd, "rank", lambda r=r: r)
        monkeypatch.setattr(cfd, "world_size", lambda: 2)
        monkeypatch.setattr(T, "is_main_rank", lambda r=r: r == 0)
        monkeypatch.setattr(T, "global_mean", lambda value, count, device: value)
        monkeypatch.setattr(T, "train_step", lambda model, opt, gm, x, t, task, ac, r=r:
                            seen.setdefault(r, []).append((x, t)) or torch.tensor(1.0))
        T.run_many(["sgd"], cfg, data, torch.device("cpu"), on_error="raise")
    for step in range(3):
        x, t = data.train_batch(step, 16, cfg.seed)
        assert [seen[r][step][0].shape[0] for r in (0, 1)] == [8, 8]
        assert torch.equal(torch.cat([seen[0][step][0], seen[1][step][0]]), x)
        assert torch.equal(torch.cat([seen[0][step][1], seen[1][step][1]]), t)


def test_global_batch_not_divisible_by_ranks_is_an_error(tmp_path):
    proc = _torchrun(["train", "--optimizer", "sgd", *TINY, "--batch-size", "15", "--out", str(tmp_path / "x")])
    assert proc.returncode != 0
    assert "batch_size 15 (the global batch) is not divisible by the 2 ranks" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_launcher_errors_without_torchrun(tmp_path, capsys, monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    out = str(tmp_path / "run")
    assert main(["train", "--optimizer", "sgd", *TINY, "--ddp", "--out", out]) == 2
    assert "--ddp wraps the model for a distributed run" in capsys.readouterr().err
    assert main(["train", "--optimizer", "sgd", *TINY, "--distributed", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--distributed needs the environment of a launcher" in err and "RANK" in err and "torchrun" in err
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                 ("MASTER_PORT", "29999")):
        monkeypatch.setenv(k, v)
    assert main(["train", "--optimizer", "sgd", *TINY, "--device", "cpu", "--dist-backend", "nccl", "--out", out]) == 2
    assert "--dist-backend nccl needs CUDA devices" in capsys.readouterr().err
    assert main(["train", "--optimizer", "sgd", *TINY, "--dist-backend", "tcp", "--out", out]) == 2
    assert "dist_backend must be one of gloo, nccl" in capsys.readouterr().err
    assert main(["train", "--optimizer", "adahessian", *TINY, "--distributed", "--out", out]) == 2
    assert "adahessian cannot run data-parallel" in capsys.readouterr().err
    assert not os.path.exists(out)
    assert not dist.is_initialized()  # the process group of the last call was destroyed
