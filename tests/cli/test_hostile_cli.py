"""The ``curvfun`` command against hostile or careless input: files that carry code, copied and
reused run folders, interrupted comparisons, diverging runs, bad values, unwritable folders,
damaged checkpoints and a data-parallel peer that dies. Each case asserts what the user sees."""

from __future__ import annotations

import builtins
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch

import curvfun
from curvfun.__main__ import main
from curvfun.cli import train as T

SRC = os.path.dirname(os.path.dirname(os.path.abspath(curvfun.__file__)))
QUIET = ["--no-progress", "--threads", "1", "--no-plots", "--mem-probe-steps", "0", "--train-eval-size", "64",
         "--test-eval-size", "64", "--eval-every", "2"]


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def tree_bytes(folder) -> dict:
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(folder) for f in files}


# ----------------------------------------------------------------------------- files that carry code

class _Payload:
    """Unpickling this calls ``fn(arg)``: what a hostile checkpoint does."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _hostile_checkpoint(path, marker, how):
    payload = (_Payload(os.system, f"touch {marker}") if how == "system" else
               _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": T.CHECKPOINT_FORMAT, "step": 1, "config": {}, "model": {}, "x": payload}, path)


@pytest.mark.parametrize("how, culprit", [("system", "posix.system"), ("exec", "exec")])
def test_a_checkpoint_that_carries_code_is_refused_and_never_run(tmp_path, capsys, how, culprit):
    """As --resume FILE, as `resume:` of --config, and as the latest checkpoint of a run folder."""
    marker = tmp_path / "pwned"
    ck = tmp_path / "evil.pt"
    _hostile_checkpoint(ck, marker, how)
    _hostile_checkpoint(tmp_path / "runs" / "x" / "checkpoints" / "step_000001.pt", marker, how)
    (tmp_path / "c.yaml").write_text(f"resume: {ck}\n")
    for argv in (["train", "--resume", str(ck)], ["train", "--config", str(tmp_path / "c.yaml")],
                 ["train", "--resume", str(tmp_path / "runs" / "x")]):
        rc, out, err = run([*argv, *QUIET], capsys)
        assert rc == 2 and "curvfun train: error: refusing to load checkpoint" in err, err
        assert f"it refers to the Python object {culprit}, not only to tensors" in err, err
        assert "could run code it carries" in err, err
        assert "Traceback" not in err and not marker.exists()
    assert not os.path.exists(tmp_path / "runs" / "x" / "results.md")


def test_a_cifar_pickle_that_carries_code_is_refused_and_never_run(tmp_path):
    import pickle
    from curvfun.cli.data import DataError, read_cifar_batch
    marker = tmp_path / "pwned"
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Payload(os.system, f"touch {marker}"), b"labels": [0]}, fh)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        read_cifar_batch(str(tmp_path / "test_batch"))
    assert not marker.exists()


# ----------------------------------------------------------------------------- self-contained run folders

def test_a_copied_run_folder_resumes_into_itself(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    rc, _, err = run(["train", "--steps", "4", "--checkpoint-every", "2", "--out", str(a), *QUIET], capsys)
    assert rc == 0, err
    ck = torch.load(a / "checkpoints" / "step_000004.pt", weights_only=True)
    assert ck["config"]["out"] is None  # no path stored: the folder is wherever the file lies
    shutil.copytree(a, b)
    before = tree_bytes(a)
    rc, out, err = run(["train", "--resume", str(b), "--steps", "6", *QUIET], capsys)
    assert rc == 0, err
    assert "resuming" in out and "at step 4" in out and f"run folder: {b}" in out
    assert tree_bytes(a) == before  # the original is untouched, byte for byte
    assert sorted(os.listdir(b / "checkpoints")) == ["step_000002.pt", "step_000004.pt", "step_000006.pt"]
    steps = [int(r.split(",")[1]) for r in (b / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(7))


def test_a_folder_holding_another_run_is_refused(tmp_path, capsys):
    a = tmp_path / "a"
    assert run(["train", "--steps", "2", "--checkpoint-every", "2", "--out", str(a), *QUIET], capsys)[0] == 0
    before = tree_bytes(a)
    for cmd in ("train", "compare"):
        rc, _, err = run([cmd, "--optimizer" if cmd == "train" else "--optimizers", "adam", "--steps", "2",
                          "--out", str(a), *QUIET], capsys)
        assert rc == 2, err
        assert f"run folder {a} already holds a run (config.yaml, results.md, results.json, metrics.csv" in err
        assert f"continue it with `curvfun {cmd} --resume {a}`, or choose another --out" in err
    assert tree_bytes(a) == before


def test_resuming_a_folder_whose_checkpoints_belong_to_another_run(tmp_path, capsys):
    """A folder with sgd's checkpoints and adam's config and results (mixed by an older version):
    refused, naming the difference; --force-resume moves the folder's run files aside first."""
    x, y = tmp_path / "x", tmp_path / "y"
    common = ["train", "--steps", "4", "--checkpoint-every", "2", *QUIET]
    assert run([*common, "--optimizer", "sgd", "--out", str(x)], capsys)[0] == 0
    assert run([*common, "--optimizer", "adam", "--out", str(y)], capsys)[0] == 0
    for f in ("config.yaml", "results.md", "results.json", "metrics.csv"):
        shutil.copy(y / f, x / f)
    rc, _, err = run(["train", "--resume", str(x), "--steps", "6", *QUIET], capsys)
    assert rc == 2
    assert f"run folder {x} holds another run than checkpoint {x / 'checkpoints' / 'step_000004.pt'}" in err
    assert "its config.yaml differs from the checkpoint's (optimizer: 'adam' vs 'sgd'" in err
    assert "pass --force-resume" in err and not (x / "checkpoints" / "step_000006.pt").exists()
    rc, out, err = run(["train", "--resume", str(x), "--steps", "6", "--force-resume", *QUIET], capsys)
    assert rc == 0, err
    assert f"--force-resume: moved the run files of {x} to {x}/previous-" in err
    (aside,) = [p for p in x.iterdir() if p.name.startswith("previous-")]
    assert (aside / "config.yaml").read_text() == (y / "config.yaml").read_text()
    assert json.loads((x / "results.json").read_text())[0]["optimizer"] == "sgd"
    assert (x / "checkpoints" / "step_000006.pt").exists()


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """Ctrl-C at step 7 (checkpoints every 2), a half-written checkpoint left by a kill -9, then
    `train --resume FOLDER`: same parameters and metrics.csv as the uninterrupted run."""
    common = ["train", "--optimizer", "adam", "--steps", "10", "--checkpoint-every", "2", *QUIET]
    assert run([*common, "--out", str(tmp_path / "full")], capsys)[0] == 0
    real, calls = T.train_step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(T, "train_step", interrupted)
    part = tmp_path / "part"
    rc, _, err = run([*common, "--out", str(part)], capsys)
    assert rc == 130 and f"interrupted; continue from the latest checkpoint with `curvfun train --resume {part}`" in err
    (part / "checkpoints" / "step_000008.pt.tmp").write_bytes(b"PK\x03\x04 half a zip")  # killed mid-write
    monkeypatch.setattr(T, "train_step", real)
    rc, out, err = run(["train", "--resume", str(part), *QUIET], capsys)
    assert rc == 0 and "at step 6" in out, err
    a, b = (torch.load(d / "checkpoints" / "step_000010.pt", weights_only=True) for d in (tmp_path / "full", part))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    def columns(d):
        rows = [r.split(",") for r in (d / "metrics.csv").read_text().splitlines()]
        return [[c for i, c in enumerate(r) if rows[0][i] != "time_s"] for r in rows]
    assert columns(tmp_path / "full") == columns(part)


# ----------------------------------------------------------------------------- compare: nothing finished is lost

def test_compare_interrupted_keeps_finished_optimizers_and_resume_runs_the_rest(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    args = ["compare", "--optimizers", "sgd,adam", "--steps", "1000", *QUIET, "--eval-every", "500",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "curvfun", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "results.json").exists():  # sgd finished (written atomically: complete when it exists)
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the comparison ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert (f"curvfun compare: interrupted; 1 finished optimizer(s) (sgd) are saved in {out}; run the others "
            f"with `curvfun compare --resume {out}`") in stderr
    rows = json.loads((out / "results.json").read_text())
    assert [(r["optimizer"], r["status"], r["steps"]) for r in rows] == [("sgd", "ok", 1000)]
    metrics = (out / "metrics.csv").read_text()
    assert metrics.count("\nsgd,") == 1001 and "adam" not in metrics
    assert "| sgd" in (out / "results.md").read_text()

    ran = []
    real = T.run_optimizer
    monkeypatch.setattr(T, "run_optimizer", lambda name, *a, **k: ran.append(name) or real(name, *a, **k))
    rc, stdout, err = run(["compare", "--resume", str(out), "--no-progress", "--threads", "1"], capsys)
    assert rc == 0, err
    assert ran == ["adam"] and "resuming" in stdout and "1 finished, running adam" in stdout
    rows = json.loads((out / "results.json").read_text())
    assert [(r["optimizer"], r["status"]) for r in rows] == [("sgd", "ok"), ("adam", "ok")]
    assert (out / "metrics.csv").read_text().startswith(metrics)  # sgd's rows kept as they were
    assert "| sgd" in stdout and "| adam" in stdout
    rc, _, err = run(["compare", "--resume", str(out), "--steps", "10"], capsys)
    assert rc == 2 and "cannot change 'steps' when resuming a comparison (folder vs command line: 1000 vs 10)" in err
    rc, _, err = run(["compare", "--resume", str(tmp_path / "none")], capsys)
    assert rc == 2 and "no comparison there (its config.yaml is missing)" in err


def test_a_diverging_run_is_marked_diverged_with_its_step(tmp_path, capsys):
    rc, out, err = run(["compare", "--optimizers", "sgd", "--hp", "sgd.lr=1e4", "--steps", "5",
                        "--out", str(tmp_path / "d"), *QUIET], capsys)
    assert rc == 0, err
    (row,) = json.loads((tmp_path / "d" / "results.json").read_text())
    assert row["status"].startswith("diverged at step 2 (loss ") and "> 10 x first loss 2.29" in row["status"]
    assert row["steps"] == 2 and "| diverged at step 2" in out
    assert T.DIVERGENCE_FACTOR == 10.0


# ----------------------------------------------------------------------------- clear messages

def test_bad_values_and_unwritable_folders_get_a_message(tmp_path, capsys):
    cases = [
        (["--model-arg", "hidden=abc"],
         "model_args 'hidden' of model 'mlp' must be a list of positive integers, got 'abc' (e.g. --model-arg "
         "hidden=[128])"),
        (["--model-arg", "hidden=[0]"],
         "model_args 'hidden' of model 'mlp' must be a list of positive integers, got [0]"),
        (["--hp", "lr=abc"], "hyper-parameter 'lr' of optimizer 'sgd' must be a number, got 'abc' (its default: 0.1)"),
        (["--hp", "lrate=0.1"], "unknown hyper-parameter 'lrate' for optimizer 'sgd'; valid: lr, momentum"),
        (["--out", "/etc/passwd/x"],
         "cannot write the run folder /etc/passwd/x: Not a directory (/etc/passwd/x); choose a writable --out"),
    ]
    for extra, message in cases:
        rc, _, err = run(["train", "--steps", "2", *QUIET, *extra], capsys)
        assert rc == 2 and f"curvfun train: error: {message}" in err, err
        assert "Traceback" not in err


def test_a_damaged_checkpoint_gets_a_message(tmp_path, capsys):
    a = tmp_path / "a"
    assert run(["train", "--steps", "2", "--checkpoint-every", "2", "--out", str(a), *QUIET], capsys)[0] == 0
    state = torch.load(a / "checkpoints" / "step_000002.pt", weights_only=True)
    del state["config"]
    torch.save(state, tmp_path / "noconfig.pt")
    state["config"], state["metrics"] = {}, "x"
    torch.save(state, tmp_path / "badtype.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for name, message in (("noconfig", "is incomplete or damaged (missing 'config'); resume from another checkpoint"),
                          ("badtype", "is incomplete or damaged ('metrics' is a str, not a list)"),
                          ("text", "refusing to load checkpoint")):  # not: "could run code"
        rc, _, err = run(["train", "--resume", str(tmp_path / f"{name}.pt"), *QUIET], capsys)
        assert rc == 2 and message in err and "Traceback" not in err, err
    assert "it is not a readable torch file (UnpicklingError: Unsupported operand 110)" in err


# ----------------------------------------------------------------------------- a data-parallel peer dies

def test_the_closing_barrier_failing_is_a_distributed_error():
    from curvfun.cli.launch import leave_together
    from curvfun.distributed import CurvfunDistributedError

    def barrier():
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    with pytest.raises(CurvfunDistributedError, match=r"rank 0 of 1: collective 'closing barrier' \(exit\) failed: "
                                                      r"\[gloo.*Connection closed by peer. Another rank probably died"):
        leave_together(barrier)


def _rank_main(rank: int, port: int, out_dir: str, argv: list) -> None:
    """One rank of `curvfun train` under torch.distributed; rank 1 dies at its third step."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    log = open(os.path.join(out_dir, f"rank{rank}.err"), "w")
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    if rank == 1:
        real, calls = T.train_step, []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                os._exit(1)
            return real(*a, **k)
        T.train_step = dying
    try:
        rc = main(argv)
    except BaseException:  # what would reach the user as a traceback
        traceback.print_exc()
        rc = 99
    log.write(f"\nEXIT {rc}\n")
    log.flush()
    os._exit(0)


def test_a_dead_peer_ends_rank_0_with_the_distributed_error_only(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["train", "--optimizer", "sgd", "--steps", "20", "--batch-size", "16", "--dist-timeout", "30",
            "--out", str(tmp_path / "run"), *QUIET]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tmp_path), argv)) for r in range(2)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    for p in procs:
        p.join(max(1.0, 90 - (time.monotonic() - t0)))
    for p in procs:
        if p.is_alive():
            p.kill()
    err = (tmp_path / "rank0.err").read_text()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == "EXIT 1", err
    # one line: the CurvfunDistributedError message (no traceback, no second error from the exit barrier)
    assert len(lines) == 2 and lines[0].startswith("curvfun train: error: rank 0 of 2: collective "), err
    assert lines[0].endswith("Another rank probably died or timed out; the job stops here."), err
