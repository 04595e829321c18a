"""Training runs of the ``curvfun`` command: the ASDL loop, evaluation, checkpoints, measurements.

Measurements (per optimizer, same model init, seed, data order and step budget):

* ``time/step``: median wall-clock time of one training step (forward, backward, curvature,
  inverse, preconditioning, ``optimizer.step()``; not data loading or evaluation); on CUDA the
  device is synchronised before the clock is read;
* ``steps/s``: steps divided by the summed step times, so refresh steps of interval-based
  methods count (amortised throughput);
* ``peak mem``: on CUDA, ``torch.cuda.max_memory_allocated`` over the run; on CPU, the peak of
  live torch allocations (model, gradients, optimizer and curvature state, activations) during
  a probe that builds a fresh model + optimizer + maker and runs ``mem_probe_steps`` steps under
  ``torch.profiler`` with ``profile_memory=True`` (the probe runs on a copy, with the RNG state
  restored, so it changes nothing in the timed run);
* ``train loss``: mean loss over a fixed training subset (``train_eval_size``) in eval mode;
  ``test acc`` / ``test ppl``: accuracy / exp(mean token loss) on the test split.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from .config import CliError, Config
from .launch import global_mean, is_main_rank, shard
from .models import build_model
from .optimizers import BuildContext, get_spec

METRIC_FIELDS = ("optimizer", "step", "time_s", "batch_loss", "train_loss", "test_loss", "test_accuracy",
                 "test_perplexity")
CHECKPOINT_FORMAT = "curvfun-checkpoint-1"
#: a run has diverged once its batch loss is not finite or exceeds this multiple of its first batch loss
DIVERGENCE_FACTOR = 10.0


@dataclass
class RunResult:
    optimizer: str
    hparams: Dict[str, Any]
    task: str
    status: str = "ok"
    steps_done: int = 0
    rows: List[dict] = field(default_factory=list)
    step_times: List[float] = field(default_factory=list)
    peak_mem_mb: Optional[float] = None
    final: Dict[str, float] = field(default_factory=dict)
    model: Any = None
    optimizer_obj: Any = None
    grad_maker: Any = None
    #: the timings of a result read back from a run folder (its step times are not kept there)
    measured: Optional[Dict[str, float]] = None

    @property
    def train_time(self) -> float:
        if self.measured is not None:
            return self.measured["train_time_s"]
        return float(sum(self.step_times))

    @property
    def time_per_step_ms(self) -> float:
        if self.measured is not None:
            return self.measured["time_per_step_ms"]
        return 1e3 * statistics.median(self.step_times) if self.step_times else float("nan")

    @property
    def steps_per_s(self) -> float:
        if self.measured is not None:
            return self.measured["steps_per_s"]
        return len(self.step_times) / self.train_time if self.step_times and self.train_time > 0 else float("nan")

    def summary(self) -> dict:
        out = {"optimizer": self.optimizer, "status": self.status, "steps": self.steps_done,
               "final_train_loss": self.final.get("train_loss", float("nan")),
               "final_test_loss": self.final.get("test_loss", float("nan")),
               "time_per_step_ms": self.time_per_step_ms, "steps_per_s": self.steps_per_s,
               "peak_mem_mb": self.peak_mem_mb, "train_time_s": self.train_time, "hparams": self.hparams}
        key = "test_perplexity" if self.task == "lm" else "test_accuracy"
        out[key] = self.final.get(key, float("nan"))
        return out


# ----------------------------------------------------------------------------- environment

def select_device(cfg: Config) -> torch.device:
    from .. import distributed as cfd
    if cfd.is_distributed() and torch.cuda.is_available() and (cfg.device == "auto" or cfg.device.startswith("cuda")):
        return torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK's (set by cli.launch)
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"device {cfg.device!r} requested but CUDA is not available (torch.cuda.is_available() "
                       "is False); use --device cpu or --device auto")
    return torch.device(cfg.device)


def amp_context(cfg: Config, device: torch.device):
    """bfloat16 autocast on CUDA (no loss scaling needed); on CPU ``--amp`` is ignored with a warning."""
    if not cfg.amp:
        return contextlib.nullcontext
    if device.type != "cuda":
        warnings.warn("--amp: mixed precision is used on CUDA only; running in float32 on "
                      f"{device.type}", stacklevel=2)
        return contextlib.nullcontext
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- one step, evaluation

def train_step(model, optimizer, grad_maker, x, t, task: str, autocast) -> torch.Tensor:
    """One step of the ASDL loop; returns the (detached) batch loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        dummy_y = grad_maker.setup_model_call(model, x)
        if task == "lm":  # logits [N, T, V] -> [N*T, V]: the curvature sees N*T categorical outputs
            logits = dummy_y.view(-1, getattr(model, "module", model).head.out_features)
            if hasattr(grad_maker, "setup_logits_repr"):
                grad_maker.setup_logits_repr(logits)
            grad_maker.setup_loss_call(F.cross_entropy, logits, t.reshape(-1))
        else:
            grad_maker.setup_loss_call(F.cross_entropy, dummy_y, t)
        _, loss = grad_maker.forward_and_backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model, data, eval_sets, device, batch_size: int, autocast) -> Dict[str, float]:
    was_training = model.training
    model.eval()
    out: Dict[str, float] = {}
    try:
        for split, x, y in eval_sets:
            total, correct, count = 0.0, 0, 0
            for i in range(0, len(x), batch_size):
                xb = data.prepare(x[i:i + batch_size]).to(device)
                yb = y[i:i + batch_size].to(device)
                with autocast():
                    logits = model(xb)
                logits = logits.float().reshape(-1, logits.shape[-1])
                yb = yb.reshape(-1)
                total += F.cross_entropy(logits, yb, reduction="sum").item()
                correct += (logits.argmax(-1) == yb).sum().item()
                count += yb.numel()
            out[f"{split}_loss"] = total / count
            if split == "test":
                if data.task == "lm":
                    out["test_perplexity"] = math.exp(min(out["test_loss"], 700.0))
                else:
                    out["test_accuracy"] = correct / count
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- memory probe

_PROFILER_NOISE = ("SyncActivityProfilerHandler", "CPUAllocator.cpp", "Completed Stage", "profiler_st")


@contextlib.contextmanager
def _filtered_stderr():
    """Drop the profiler's C++ start/stop lines from fd 2; replay everything else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not any(n in line for n in _PROFILER_NOISE):
                    print(line, file=sys.stderr)


def _peak_bytes(prof) -> int:
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def probe_peak_memory_mb(make, data, cfg: Config, device, autocast):
    """Peak torch CPU memory (MB) of building model + optimizer + maker and ``mem_probe_steps`` steps.

    Returns ``(megabytes or None, exception or None)``: a failing probe is reported by the caller
    only if the timed run then succeeds (otherwise the run's own error says it all)."""
    if cfg.mem_probe_steps <= 0 or device.type != "cpu":
        return None, None
    from torch.profiler import ProfilerActivity, profile
    try:
        with torch.random.fork_rng(devices=[]), _filtered_stderr():
            batches = [shard(*data.train_batch(s, cfg.batch_size, cfg.seed)) for s in range(cfg.mem_probe_steps)]
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model, opt, gm = make()
                for x, t in batches:
                    train_step(model, opt, gm, x.to(device), t.to(device), data.task, autocast)
                del model, opt, gm
        return _peak_bytes(prof) / 2 ** 20, None
    except Exception as exc:
        return None, exc


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}.pt")


def save_checkpoint(path: str, *, step, name, cfg: Config, model, optimizer, grad_maker, rows, step_times):
    """Write one checkpoint atomically (temporary file, then ``os.replace``). It holds tensors,
    numbers, strings and containers only (loadable with ``weights_only=True``) and no path: the
    run folder is wherever the file lies (see :func:`checkpoint_run_dir`)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, "optimizer_name": name,
        "config": {**cfg.to_dict(), "out": None, "resume": None},
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "grad_maker": grad_maker.state_dict() if hasattr(grad_maker, "state_dict") else None,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "metrics": rows, "step_times": step_times,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def find_checkpoint(path: str) -> str:
    """A checkpoint file, or the latest one of a run folder."""
    if os.path.isdir(path):
        ck_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        files = sorted(f for f in os.listdir(ck_dir) if f.startswith("step_") and f.endswith(".pt"))
        if not files:
            raise CliError(f"no checkpoint (checkpoints/step_NNNNNN.pt) found in {path}")
        return os.path.join(ck_dir, files[-1])
    if not os.path.isfile(path):
        raise CliError(f"checkpoint not found: {path}")
    return path


def checkpoint_run_dir(path: str) -> Optional[str]:
    """The run folder a checkpoint file belongs to (``RUN/checkpoints/step_N.pt`` -> ``RUN``), or None."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


#: key -> type of every entry a curvfun checkpoint must hold
_CHECKPOINT_KEYS = {"step": int, "optimizer_name": str, "config": dict, "model": dict, "optimizer": dict,
                    "rng": dict, "metrics": list, "step_times": list}


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` only: tensors, numbers, strings and
    containers; anything else (a pickled object, a function call) is refused, never executed."""
    path = find_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        culprit = re.search(r"GLOBAL ([\w.]+)", text)
        if culprit:
            why = (f"it refers to the Python object {culprit.group(1)}, not only to tensors, numbers, strings and "
                   "containers; curvfun's own checkpoints never do, and unpickling such a file could run code it "
                   "carries")
        else:
            unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
            detail = unpickler.group(1).strip() if unpickler else (text.strip().splitlines() or [""])[0]
            why = f"it is not a readable torch file ({type(exc).__name__}: {detail})"
        raise CliError(f"refusing to load checkpoint {path}: {why}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CliError(f"{path} is not a curvfun checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    wrong = [f"{k!r} is a {type(state[k]).__name__}, not a {t.__name__}" for k, t in _CHECKPOINT_KEYS.items()
             if k in state and not isinstance(state[k], t)]
    if missing or wrong or "torch" not in state["rng"]:
        what = (f"missing {', '.join(map(repr, missing))}" if missing else
                "; ".join(wrong) if wrong else "missing 'rng'['torch']")
        raise CliError(f"checkpoint {path} is incomplete or damaged ({what}); resume from another checkpoint "
                       f"of the run (its checkpoints/ folder) or start the run again")
    state["path"] = path
    return state


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# ----------------------------------------------------------------------------- one optimizer

def run_optimizer(name: str, cfg: Config, data, init_state, device, *, run_dir: Optional[str] = None,
                  resume: Optional[dict] = None, position: int = 0) -> RunResult:
    """Train a fresh copy of the model (``init_state``) with optimizer ``name`` for ``cfg.steps`` steps."""
    from tqdm.auto import tqdm

    spec = get_spec(name)
    hp = spec.hyperparameters(cfg.hparams.get(name), cfg.model)
    ctx = BuildContext(batch_size=cfg.batch_size, steps=cfg.steps, seed=cfg.seed)
    autocast = amp_context(cfg, device)

    def make():
        """(model to train, optimizer, grad maker); the model is wrapped in DDP with ``--ddp``."""
        model = build_model(cfg.model, data.info, cfg.model_args)
        model.load_state_dict(init_state)
        model.to(device).train()
        if cfg.ddp:
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt, gm = spec.build(model, hp, ctx)
        return model, opt, gm

    result = RunResult(name, hp, data.task)
    result.peak_mem_mb, probe_error = probe_peak_memory_mb(make, data, cfg, device, autocast)

    torch.manual_seed(cfg.seed)
    trained, optimizer, grad_maker = make()
    model = getattr(trained, "module", trained)  # evaluated and saved unwrapped (no collective inside)
    main = is_main_rank()  # only rank 0 evaluates, shows progress and writes checkpoints
    eval_sets = data.eval_sets(cfg.train_eval_size, cfg.test_eval_size)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(_to_device(resume["optimizer"], device))
        if resume.get("grad_maker") is not None and hasattr(grad_maker, "load_state_dict"):
            grad_maker.load_state_dict(resume["grad_maker"])
        torch.set_rng_state(resume["rng"]["torch"])
        if resume["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(resume["rng"]["cuda"])
        start = int(resume["step"])
        result.rows = [dict(r) for r in resume["metrics"]]
        result.step_times = list(resume["step_times"])
    else:
        result.rows.append(_row(name, 0, 0.0, None, evaluate(model, data, eval_sets, device, cfg.eval_batch_size,
                                                            autocast) if main else None))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # the divergence reference: the batch loss of step 1 (restored with the metrics on resume)
    first_loss = next((r["batch_loss"] for r in result.rows if r["step"] == 1 and r["batch_loss"] is not None), None)
    result.model, result.optimizer_obj, result.grad_maker = model, optimizer, grad_maker
    result.steps_done = start
    bar = tqdm(total=cfg.steps, initial=start, desc=f"{name:>12}", disable=not (cfg.progress and main), leave=True,
               position=position, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for step in range(start, cfg.steps):
            x, t = shard(*data.train_batch(step, cfg.batch_size, cfg.seed))  # this rank's slice
            x, t = x.to(device), t.to(device)
            _sync(device)
            t0 = time.perf_counter()
            try:
                loss = train_step(trained, optimizer, grad_maker, x, t, data.task, autocast)
                loss_value = global_mean(loss.item(), x.shape[0], device)  # the whole batch's, on every rank
            except Exception as exc:  # e.g. sampling from NaN logits: report as divergence
                if all(torch.isfinite(p).all() for p in model.parameters()):
                    raise
                result.status = f"diverged at step {step + 1} ({type(exc).__name__})"
                result.steps_done = step
                break
            _sync(device)
            result.step_times.append(time.perf_counter() - t0)
            done = step + 1
            result.steps_done = done
            metrics = None
            if first_loss is None:
                first_loss = loss_value
            diverged = not math.isfinite(loss_value) or (
                math.isfinite(first_loss) and loss_value > DIVERGENCE_FACTOR * abs(first_loss))
            if main and (done % cfg.eval_every == 0 or done == cfg.steps or diverged):
                metrics = evaluate(model, data, eval_sets, device, cfg.eval_batch_size, autocast)
            result.rows.append(_row(name, done, result.train_time, loss_value, metrics))
            if diverged:
                why = "non-finite loss" if not math.isfinite(loss_value) else (
                    f"loss {loss_value:.4g} > {DIVERGENCE_FACTOR:g} x first loss {first_loss:.4g}")
                result.status = f"diverged at step {done} ({why})"
                break
            if run_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                save_checkpoint(checkpoint_path(run_dir, done), step=done, name=name, cfg=cfg, model=model,
                                optimizer=optimizer, grad_maker=grad_maker, rows=result.rows,
                                step_times=result.step_times)
            bar.update(1)
            if done % 10 == 0 or metrics:
                post = {"loss": f"{loss_value:.3f}"}
                if metrics and "test_accuracy" in metrics:
                    post["acc"] = f"{metrics['test_accuracy']:.3f}"
                if metrics and "test_perplexity" in metrics:
                    post["ppl"] = f"{metrics['test_perplexity']:.1f}"
                bar.set_postfix(post, refresh=False)
    finally:
        bar.close()
    if device.type == "cuda":
        result.peak_mem_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    if probe_error is not None:
        warnings.warn(f"{name}: memory probe failed ({type(probe_error).__name__}: {probe_error}); "
                      "peak memory not measured")
    evaluated = [r for r in result.rows if r.get("test_loss") is not None]
    if evaluated:
        last = evaluated[-1]
        result.final = {k: last[k] for k in ("train_loss", "test_loss", "test_accuracy", "test_perplexity")
                        if last.get(k) is not None}
    return result


def _row(name, step, time_s, batch_loss, metrics) -> dict:
    row = {k: None for k in METRIC_FIELDS}
    row.update(optimizer=name, step=step, time_s=time_s, batch_loss=batch_loss)
    if metrics:
        row.update(metrics)
    return row


def run_many(names, cfg: Config, data, device, *, run_dir=None, resume=None, on_error="record", on_result=None):
    """Run each optimizer from the same initial parameters; errors are recorded (or raised).

    ``on_result(result, error_traceback_or_None)`` is called as soon as each optimizer ends (the
    caller writes its results then). A failed collective (:class:`CurvfunDistributedError`) ends
    the whole run: the other ranks cannot go on without the failed one."""
    from ..distributed import CurvfunDistributedError
    torch.manual_seed(cfg.seed)
    init_state = {k: v.clone() for k, v in build_model(cfg.model, data.info, cfg.model_args).state_dict().items()}
    results, errors = [], []
    for i, name in enumerate(names):
        tb = None
        try:
            r = run_optimizer(name, cfg, data, init_state, device, run_dir=run_dir, resume=resume)
        except (CliError, CurvfunDistributedError):
            raise
        except Exception as exc:
            if on_error == "raise":
                raise
            tb = traceback.format_exc()
            errors.append((name, tb))
            print(f"curvfun: optimizer {name!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            r = RunResult(name, get_spec(name).hyperparameters(cfg.hparams.get(name), cfg.model), data.task,
                          status=f"error: {type(exc).__name__}: {str(exc)[:80]}")
        results.append(r)
        if on_result is not None:
            on_result(r, tb)
    return results, errors
