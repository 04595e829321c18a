"""Issue 6 benchmark: AdaFisher's step against torch.optim.Adam's (target: AdaFisher <= 1.3x Adam).

Per model (the foundation MLP and CNN, batch 128) and in one run, medians after warm-up of:

* a full training step (zero_grad, forward, loss, backward, ``optimizer.step()``) with SGD, Adam
  and AdaFisher (default ``TCov=100``: the factor hooks are armed only on refresh steps, so the
  median is an ordinary step), and with AdaFisher refreshing on every step (``TCov=1``);
* the amortised AdaFisher step at ``TCov=100``: (99 ordinary + 1 refresh) / 100;
* ``optimizer.step()`` alone (gradients already in place) for Adam and AdaFisher.

Ratios are to Adam's full step (and, for the step-alone rows, to Adam's ``step()``). The wall-clock
section uses 2 threads (the suite's convention); on a shared, overloaded machine wall-clock medians
swing by 10x, so a second section repeats the measurement with 1 thread in **CPU time of the
process** (``time.process_time``), which does not count the time the process waits for a core.
Run: ``python benchmarks/bench_adafisher.py`` (or ``python benchmarks/run.py others``).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from common import batch, cnn, median_time, mlp, setup, table

from curvfun.optim import AdaFisher


def _full_step(model, opt, x, y):
    def fn():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return fn


def median_cpu_time(fn, warmup: int = 3, repeat: int = 10) -> float:
    """Median CPU seconds of the process for ``fn()`` (use with one thread)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


_TIMER = {"wall": median_time, "cpu": median_cpu_time}


def _median_of_rounds(fns: dict, clock: str, rounds: int = 3, repeat: int = 15) -> dict:
    """Interleave the measurements over ``rounds`` so that drift on a shared machine hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_TIMER[clock](fn, warmup=3, repeat=repeat))
    return {k: statistics.median(v) for k, v in times.items()}


def run(kind: str, make, clock: str = "wall") -> dict:
    x, y = batch(kind)
    models = {k: make() for k in ("sgd", "adam", "adafisher", "adafisher_t1")}
    for m in models.values():
        m.load_state_dict(models["sgd"].state_dict())
    opts = {
        "sgd": torch.optim.SGD(models["sgd"].parameters(), lr=1e-2),
        "adam": torch.optim.Adam(models["adam"].parameters(), lr=1e-3),
        "adafisher": AdaFisher(models["adafisher"], lr=1e-3),  # TCov=100
        "adafisher_t1": AdaFisher(models["adafisher_t1"], lr=1e-3, TCov=1),
    }
    full = _median_of_rounds({k: _full_step(models[k], opts[k], x, y) for k in opts}, clock)
    # step() alone, on gradients already computed
    for k in ("adam", "adafisher"):
        opts[k].zero_grad(set_to_none=True)
        F.cross_entropy(models[k](x), y).backward()
    alone = _median_of_rounds({k: opts[k].step for k in ("adam", "adafisher")}, clock, repeat=30)
    amortised = (99 * full["adafisher"] + full["adafisher_t1"]) / 100
    a = full["adam"]
    table(f"{kind.upper()} (batch {x.shape[0]}, {clock} time): full training step", [
        ("SGD", full["sgd"], full["sgd"] / a),
        ("Adam (baseline)", a, 1.0),
        ("AdaFisher, ordinary step (TCov=100)", full["adafisher"], full["adafisher"] / a),
        ("AdaFisher, refresh step (TCov=1)", full["adafisher_t1"], full["adafisher_t1"] / a),
        ("AdaFisher, amortised at TCov=100", amortised, amortised / a),
    ])
    table(f"{kind.upper()} ({clock} time): optimizer.step() alone", [
        ("Adam.step()", alone["adam"], 1.0),
        ("AdaFisher.step() (ordinary)", alone["adafisher"], alone["adafisher"] / alone["adam"]),
    ])
    return {"full": full, "alone": alone, "amortised": amortised}


def main() -> None:
    print("== AdaFisher vs Adam (issue 6; target: AdaFisher step <= 1.3x Adam's) ==")
    setup(threads=2)
    print("-- wall clock, 2 threads --")
    run("mlp", mlp, "wall")
    run("cnn", cnn, "wall")
    setup(threads=1)
    print("\n-- CPU time of the process, 1 thread (robust to a busy machine) --")
    run("mlp", mlp, "cpu")
    run("cnn", cnn, "cpu")


if __name__ == "__main__":
    main()
