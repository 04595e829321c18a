"""Outputs of a run folder: metrics CSV, results table (markdown + JSON), PNG plots.

Files written to the run folder:

* ``config.yaml``: the resolved configuration (re-usable with ``--config``), with the
  hyper-parameters each optimizer actually used under ``hparams``;
* ``metrics.csv``: one row per optimizer and step: ``step``, ``time_s`` (cumulative training
  time), ``batch_loss``, and at evaluation steps ``train_loss``, ``test_loss`` and
  ``test_accuracy`` (classification) or ``test_perplexity`` (language modelling);
* ``results.md`` (the table printed at the end) and ``results.json``;
* ``loss_vs_steps.png``, ``loss_vs_time.png``, ``accuracy_vs_steps.png``, ``accuracy_vs_time.png``
  (``perplexity_vs_*.png`` for language models).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Dict, List, Sequence

from .config import CliError
from .train import METRIC_FIELDS, RunResult


def _fmt(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def results_table(results: Sequence[RunResult], cfg) -> str:
    """Markdown table (also readable as plain text)."""
    lm = any(r.task == "lm" for r in results)
    metric = "test ppl" if lm else "test acc (%)"
    header = ["optimizer", "final train loss", metric, "time/step (ms)", "peak mem (MB)", "steps/s", "status"]
    rows = []
    for r in results:
        s = r.summary()
        score = s.get("test_perplexity") if lm else s.get("test_accuracy")
        score = _fmt(score, ".2f") if lm else _fmt(None if score is None else 100 * score, ".1f")
        rows.append([r.optimizer, _fmt(s["final_train_loss"], ".4f"), score, _fmt(s["time_per_step_ms"], ".2f"),
                     _fmt(s["peak_mem_mb"], ".1f"), _fmt(s["steps_per_s"], ".1f"), r.status])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    title = (f"curvfun {cfg.data} / {cfg.model}: {cfg.steps} steps, batch {cfg.batch_size}, seed {cfg.seed}")
    return "\n".join([title, "", line(header), sep, *(line(r) for r in rows)]) + "\n"


def _atomic_write(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then ``os.replace`` it: a reader (or a
    crash) sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_metrics_csv(results: Sequence[RunResult], path: str) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METRIC_FIELDS))
    w.writeheader()
    for r in results:
        for row in r.rows:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
    _atomic_write(path, buf.getvalue())


def read_metrics_csv(path: str) -> List[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [{k: (v if k == "optimizer" else (float(v) if v != "" else None)) for k, v in row.items()}
                for row in csv.DictReader(fh)]


def write_results(results: Sequence[RunResult], cfg, run_dir: str) -> str:
    """metrics.csv, then results.json (what :func:`read_finished` trusts), then results.md; each
    replaced atomically. Called after every optimizer, so an interrupt loses nothing finished."""
    table = results_table(results, cfg)
    write_metrics_csv(results, os.path.join(run_dir, "metrics.csv"))
    _atomic_write(os.path.join(run_dir, "results.json"),
                  json.dumps([_jsonable(r.summary()) for r in results], indent=2))
    _atomic_write(os.path.join(run_dir, "results.md"), table)
    return table


def read_finished(run_dir: str) -> Dict[str, RunResult]:
    """The optimizers a run folder holds complete results of (results.json rows without an error
    status whose metrics.csv rows reach their last step), rebuilt as results for the table."""
    try:
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as fh:
            summaries = json.load(fh)
        rows = read_metrics_csv(os.path.join(run_dir, "metrics.csv"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read the results of {run_dir} ({exc}); start the comparison again in a new "
                       "--out") from None
    out = {}
    for s in summaries if isinstance(summaries, list) else []:
        if not isinstance(s, dict) or str(s.get("status", "error")).startswith("error"):
            continue
        name = s.get("optimizer")
        mine = [dict(r, step=int(r["step"])) for r in rows if r["optimizer"] == name]
        if not mine or mine[-1]["step"] != s.get("steps"):
            continue
        task = "lm" if "test_perplexity" in s else "classification"
        r = RunResult(name, s.get("hparams") or {}, task, status=s["status"], steps_done=s["steps"], rows=mine,
                      peak_mem_mb=s.get("peak_mem_mb"))
        nan = float("nan")
        r.measured = {k: nan if s.get(k) is None else s[k] for k in ("time_per_step_ms", "steps_per_s", "train_time_s")}
        evaluated = [x for x in mine if x.get("test_loss") is not None]
        if evaluated:
            r.final = {k: evaluated[-1][k] for k in ("train_loss", "test_loss", "test_accuracy", "test_perplexity")
                       if evaluated[-1].get(k) is not None}
        out[name] = r
    return out


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _smooth(values, beta=0.9):
    out, avg, n = [], 0.0, 0
    for v in values:
        n += 1
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** n))
    return out


def write_plots(results: Sequence[RunResult], run_dir: str) -> List[str]:
    """Loss and accuracy (or perplexity) against steps and against wall-clock training time."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    lm = any(r.task == "lm" for r in results)
    score_key, score_name = ("test_perplexity", "perplexity") if lm else ("test_accuracy", "accuracy")
    styles = ("-", "--", ":", "-.")

    def style(i):  # 10 colours x 4 line styles: up to 40 distinguishable curves
        return dict(color=f"C{i % 10}", linestyle=styles[(i // 10) % len(styles)])

    def finish(fig, ax, path):
        if results:
            ax.legend(fontsize=7, ncol=1 + len(results) // 16, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      borderaxespad=0.0)
        fig.tight_layout()
        tmp = f"{path}.tmp{os.getpid()}"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)

    paths = []
    for xkey, xlabel, suffix in (("step", "step", "steps"), ("time_s", "training time (s)", "time")):
        # loss: smoothed batch loss as lines, train-subset loss at evaluations as markers
        fig, ax = plt.subplots(figsize=(9.5, 5), dpi=100)
        for i, r in enumerate(results):
            color = style(i)["color"]
            steps = [row for row in r.rows if row.get("batch_loss") is not None
                     and math.isfinite(row["batch_loss"])]
            if steps:
                ax.plot([row[xkey] for row in steps], _smooth([row["batch_loss"] for row in steps]),
                        lw=1.2, label=r.optimizer, **style(i))
            ev = [row for row in r.rows if row.get("train_loss") is not None and math.isfinite(row["train_loss"])]
            if ev:
                ax.plot([row[xkey] for row in ev], [row["train_loss"] for row in ev], "o", color=color, ms=3)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss (lines: batch, smoothed; dots: train subset)")
        ax.set_title(f"train loss vs {xlabel}")
        ax.grid(alpha=0.3)
        finish(fig, ax, os.path.join(run_dir, f"loss_vs_{suffix}.png"))

        fig, ax = plt.subplots(figsize=(9.5, 5), dpi=100)
        for i, r in enumerate(results):
            ev = [row for row in r.rows if row.get(score_key) is not None]
            if ev:
                ys = [row[score_key] * (1 if lm else 100) for row in ev]
                ax.plot([row[xkey] for row in ev], ys, marker="o", ms=3, lw=1.2, label=r.optimizer, **style(i))
        if lm:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test perplexity" if lm else "test accuracy (%)")
        ax.set_title(f"test {score_name} vs {xlabel}")
        ax.grid(alpha=0.3)
        finish(fig, ax, os.path.join(run_dir, f"{score_name}_vs_{suffix}.png"))
    return paths
