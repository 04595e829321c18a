"""``curvfun`` command line: ``compare``, ``train``, ``demo``, ``list``.

    curvfun compare                      # every available optimizer on digits (MLP 64-128-10)
    curvfun compare --optimizers sgd,kfac --steps 500 --out runs/kfac-vs-sgd
    curvfun train --optimizer kfac --hp lr=0.05 --checkpoint-every 100
    curvfun train --resume runs/xyz/checkpoints/step_000100.pt
    curvfun train --config my.yaml        # keys of the config schema; flags override them
    torchrun --nproc_per_node 2 -m curvfun train --optimizer kfac   # data-parallel (see cli.launch)
    curvfun demo                          # per-sample gradient norms and the Fisher diagonal
    curvfun list                          # optimizers, models, data sets

Exit status: 0 on success, 1 when an optimizer failed during ``compare`` (the others still
run; the traceback is in ``errors.log``), when a data-parallel peer failed, or when a file could
not be written; 2 on a usage error (bad flag, name, key or file); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

from . import config as C
from .config import CliError

_DEFAULTS = C.Config()


# ----------------------------------------------------------------------------- parsing helpers

def _parse_value(text: str) -> Any:
    """JSON first (numbers like 1e-3, lists, true/false/null), then YAML, else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        import yaml
        return yaml.safe_load(text)
    except Exception:
        return text


def _key_value(text: str, what: str):
    if "=" not in text:
        raise CliError(f"{what} expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), _parse_value(value.strip())


def _help(name: str) -> str:
    f = C._FIELDS[name]
    default = getattr(_DEFAULTS, name)
    return f"{f.metadata['help']} (default: {default})"


def _add_common(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS
    p.add_argument("--config", metavar="FILE", default=S,
                   help="YAML or JSON mapping of config keys (see `curvfun list --keys`); flags override it")
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default=S, help=_help("data"))
    g.add_argument("--data-dir", dest="data_dir", default=S, help=_help("data_dir"))
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=S, help=_help("augment"))
    g.add_argument("--model", default=S, help=_help("model"))
    g.add_argument("--model-arg", dest="model_arg", action="append", metavar="KEY=VALUE", default=S,
                   help="model keyword argument, repeatable, e.g. --model-arg hidden=[256,128]")
    g = p.add_argument_group("budget and evaluation")
    for flag, name in (("--steps", "steps"), ("--batch-size", "batch_size"), ("--seq-len", "seq_len"),
                       ("--eval-every", "eval_every"), ("--eval-batch-size", "eval_batch_size"),
                       ("--train-eval-size", "train_eval_size"), ("--test-eval-size", "test_eval_size")):
        g.add_argument(flag, dest=name, type=int, default=S, help=_help(name))
    g = p.add_argument_group("execution")
    g.add_argument("--seed", type=int, default=S, help=_help("seed"))
    g.add_argument("--device", default=S, help=_help("device"))
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=S, help=_help("amp"))
    g.add_argument("--threads", type=int, default=S, help=_help("threads"))
    g.add_argument("--mem-probe-steps", dest="mem_probe_steps", type=int, default=S, help=_help("mem_probe_steps"))
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help=_help("progress"))
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=S, help=_help("plots"))
    g.add_argument("--out", default=S, help=_help("out"))
    g = p.add_argument_group("data-parallel (torchrun --nproc_per_node N -m curvfun ...)")
    g.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=S, help=_help("distributed"))
    g.add_argument("--dist-backend", dest="dist_backend", default=S, help=_help("dist_backend"))
    g.add_argument("--dist-timeout", dest="dist_timeout", type=int, default=S, help=_help("dist_timeout"))
    g.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=S, help=_help("ddp"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curvfun", description="Functional curvature for PyTorch: train and compare optimizers "
        "(SGD, Adam, K-FAC, Shampoo, AdaFisher, ...) on digits, CIFAR-10 or WikiText-2.",
        epilog="Run `curvfun COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("compare", help="train several optimizers from the same init and compare them",
                       description="Train every selected optimizer from the same initial parameters, seed, data "
                       "order and step budget; print a results table and write a run folder (config.yaml, "
                       "metrics.csv, results.md/json, PNG plots). With no arguments: all default optimizers "
                       "available in this build, on scikit-learn's digits with an MLP 64-128-10.")
    p.add_argument("--optimizers", default=argparse.SUPPRESS, metavar="A,B,...",
                   help="comma-separated optimizer names, or 'all' (default: all); see `curvfun list`")
    p.add_argument("--hp", action="append", metavar="OPT.KEY=VALUE", default=argparse.SUPPRESS,
                   help="hyper-parameter override, repeatable, e.g. --hp kfac.damping=1e-2")
    p.add_argument("--resume", default=argparse.SUPPRESS, metavar="FOLDER",
                   help="continue an interrupted comparison in its run folder: only the optimizers without "
                   "results there run (those that failed run again)")
    _add_common(p)

    p = sub.add_parser("train", help="train one optimizer (checkpoints, --resume)",
                       description="Train one model with one optimizer; write a run folder like `compare`, "
                       "and checkpoints (model, optimizer and grad-maker state_dicts, RNG state, metrics) every "
                       "--checkpoint-every steps. --resume continues a run exactly as if never stopped.")
    p.add_argument("--optimizer", default=argparse.SUPPRESS, help=_help("optimizer"))
    p.add_argument("--hp", action="append", metavar="KEY=VALUE", default=argparse.SUPPRESS,
                   help="hyper-parameter override of the optimizer, repeatable, e.g. --hp lr=0.05")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=argparse.SUPPRESS,
                   help=_help("checkpoint_every"))
    p.add_argument("--resume", default=argparse.SUPPRESS, metavar="PATH",
                   help="checkpoint file, or run folder (its latest checkpoint), to continue from; the "
                   "checkpoint's config is the base, flags may change steps, out, eval and checkpoint settings; "
                   "the run continues in the folder that holds the checkpoint unless --out is given")
    p.add_argument("--force-resume", dest="force_resume", action="store_true", default=argparse.SUPPRESS,
                   help="resume even where the run folder holds another run (other optimizer, model, seed or "
                   "config); that run's files are first moved to FOLDER/previous-<timestamp>/")
    _add_common(p)

    p = sub.add_parser("demo", help="per-sample gradient norms and the Fisher diagonal of a small MLP on digits",
                       description="Train a small MLP on digits for a few SGD steps, then print "
                       "curvfun.per_sample_grad_norms and the exact Fisher diagonal (curvfun.fisher, shape='diag') "
                       "on one batch, with plain-autograd cross-checks.")
    p.add_argument("--batch-size", type=int, default=16, help="samples in the batch (default: 16)")
    p.add_argument("--hidden", type=int, default=32, help="hidden width of the MLP 64-H-10 (default: 32)")
    p.add_argument("--train-steps", type=int, default=100, help="SGD steps before the analysis (default: 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p = sub.add_parser("list", help="list optimizers, models, data sets and config keys")
    p.add_argument("--keys", action="store_true", help="also list every config key with its default")
    return parser


def _flag_values(args: argparse.Namespace, command: str) -> Dict[str, Any]:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "model_arg", "hp", "force_resume")}
    if getattr(args, "model_arg", None):
        values["model_args"] = dict(_key_value(t, "--model-arg") for t in args.model_arg)
    if getattr(args, "hp", None):
        hp: Dict[str, Dict[str, Any]] = {}
        for text in args.hp:
            key, value = _key_value(text, "--hp")
            if "." in key:
                opt, key = key.split(".", 1)
            elif command == "train":
                opt = None  # the selected optimizer, filled in below
            else:
                raise CliError(f"--hp {text!r}: compare needs OPTIMIZER.KEY=VALUE (e.g. kfac.lr=0.05)")
            hp.setdefault(opt, {})[key] = value
        values["hparams"] = hp
    return values


def resolve_config(args: argparse.Namespace, command: str, base: Optional[dict] = None) -> C.Config:
    file_values = C.load_config_file(args.config) if getattr(args, "config", None) else {}
    flags = _flag_values(args, command)
    hp = flags.pop("hparams", None)
    cfg = C.build_config(file_values, flags, base=base)
    if hp:
        target = cfg.optimizer
        merged = {k: dict(v) for k, v in cfg.hparams.items()}
        for opt, values in hp.items():
            merged.setdefault(opt or target, {}).update(values)
        cfg = C.build_config(flag_values={"hparams": merged}, base={**cfg.to_dict(), "hparams": {}})
    return cfg


# ----------------------------------------------------------------------------- commands

@contextlib.contextmanager
def _command_scope():
    """float32 default dtype and the caller's thread count restored afterwards (main() is re-entrant)."""
    import torch
    old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        torch.set_num_threads(old_threads)


def _held_run(path: Optional[str]) -> List[str]:
    """The run files (config.yaml, results, checkpoints/ ...) a folder already holds."""
    if not path or not os.path.isdir(path):
        return []
    return [f + ("/" if f == "checkpoints" else "") for f in C.RUN_FILES if os.path.exists(os.path.join(path, f))]


def _refuse_held_run(out: str, command: str) -> None:
    held = _held_run(out)
    if held:
        raise CliError(f"run folder {out} already holds a run ({', '.join(held)}); continue it with "
                       f"`curvfun {command} --resume {out}`, or choose another --out (or delete that folder)")


def _held_config(path: str) -> Optional[dict]:
    """The config.yaml of a run folder, read with the schema (None if there is none)."""
    file = os.path.join(path, "config.yaml")
    return C.load_config_file(file) if os.path.isfile(file) else None


def _move_aside(path: str) -> str:
    """Move a folder's run files to ``path/previous-<timestamp>/``; returns that folder."""
    aside = os.path.join(path, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
    base, i = aside, 1
    while os.path.exists(aside):
        aside, i = f"{base}-{i}", i + 1
    os.makedirs(aside)
    for f in C.RUN_FILES + tuple(n for n in os.listdir(path) if n.endswith(".png")):
        if os.path.exists(os.path.join(path, f)):
            os.replace(os.path.join(path, f), os.path.join(aside, f))
    return aside


def _make_run_dir(out: Optional[str]) -> str:
    """Create the run folder (``out``, or ``runs/<timestamp>``); its absolute path."""
    try:
        if out:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, f".write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
            return os.path.abspath(out)
        base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        path, i = base, 1
        while os.path.exists(path):
            path, i = f"{base}-{i}", i + 1
        os.makedirs(path)
        return os.path.abspath(path)
    except OSError as exc:
        raise CliError(f"cannot write the run folder {out or 'runs/'}: {exc.strerror or exc}"
                       f"{f' ({exc.filename})' if exc.filename else ''}; choose a writable --out") from None


def _check_hparams(cfg: C.Config, names: List[str]) -> Dict[str, Dict[str, Any]]:
    from .optimizers import REGISTRY, get_spec
    for opt in cfg.hparams:
        if opt not in REGISTRY:
            raise CliError(f"hparams given for unknown optimizer {opt!r}; valid optimizers: {', '.join(REGISTRY)}")
    return {n: get_spec(n).hyperparameters(cfg.hparams.get(n), cfg.model) for n in names}


def _prepare(cfg: C.Config):
    """Device, threads, data set and a model check; before any folder is written."""
    import torch
    from .data import load_dataset
    from .models import build_model
    from .train import select_device
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif cfg.data == "digits":  # tiny layers: intra-op threads only add overhead (and spin on a busy machine)
        torch.set_num_threads(1)
    device = select_device(cfg)
    if cfg.amp and device.type != "cuda":
        warnings.warn(f"--amp: mixed precision is used on CUDA only; running in float32 on {device.type}")
    data = load_dataset(cfg.data, cfg.data_dir, augment=cfg.augment, seq_len=cfg.seq_len)
    build_model(cfg.model, data.info, cfg.model_args)  # fail early on a bad model / model_args
    return device, data


class _Outputs:
    """The run folder's results, rewritten (atomically) as soon as each optimizer ends."""

    def __init__(self, cfg: C.Config, run_dir: str, names: List[str], finished=None):
        self.cfg, self.run_dir, self.names = cfg, run_dir, list(names)
        self.results = dict(finished or {})
        self.errors: List[tuple] = []

    def add(self, result, tb: Optional[str]) -> None:
        self.results[result.optimizer] = result
        if tb:
            self.errors.append((result.optimizer, tb))
        self.write()

    def ordered(self):
        return [self.results[n] for n in self.names if n in self.results]

    def write(self) -> str:
        from .report import _atomic_write, write_plots, write_results
        table = write_results(self.ordered(), self.cfg, self.run_dir)
        if self.cfg.plots:
            write_plots(self.ordered(), self.run_dir)
        if self.errors:
            _atomic_write(os.path.join(self.run_dir, "errors.log"),
                          "".join(f"== {name}\n{tb}\n" for name, tb in self.errors))
        return table


def _finish(outputs: _Outputs) -> int:
    table = outputs.write()
    print()
    print(table)
    print(f"run folder: {outputs.run_dir}")
    if outputs.errors:
        print(f"curvfun: {len(outputs.errors)} optimizer(s) failed: {', '.join(n for n, _ in outputs.errors)} "
              f"(tracebacks in {os.path.join(outputs.run_dir, 'errors.log')})", file=sys.stderr)
        return 1
    return 0


def _dist_note(dctx, cfg: C.Config) -> str:
    if dctx is None:
        return ""
    return (f", {dctx.world_size} ranks ({dctx.backend}{', DDP' if cfg.ddp else ''}, "
            f"{cfg.batch_size // dctx.world_size} samples per rank)")


def _check_distributable(names: List[str], explicit: bool) -> List[str]:
    """Under torch.distributed: drop ('all') or refuse (named) optimizers that cannot run there."""
    from .optimizers import REGISTRY
    bad = [n for n in names if not REGISTRY[n].distributed]
    if bad and explicit:
        raise CliError(f"optimizer(s) {', '.join(bad)} cannot run data-parallel (their curvature is not averaged "
                       f"over ranks); leave them out or run without --distributed")
    if bad:
        from .launch import is_main_rank
        if is_main_rank():
            print(f"curvfun: leaving out {', '.join(bad)} (not data-parallel)", file=sys.stderr)
    return [n for n in names if n not in bad]


def _compare_resume(args, folder: str):
    """(config, finished results) of an interrupted comparison in ``folder``."""
    from .report import read_finished
    held = _held_config(folder) if os.path.isdir(folder) else None
    if held is None:
        raise CliError(f"compare --resume {folder}: no comparison there (its config.yaml is missing); "
                       "give the run folder of a `curvfun compare`")
    base = {**C.Config().to_dict(), **held}
    cfg = resolve_config(args, "compare", base=base)
    changed = C.run_differences(base, cfg.to_dict(), mutable=C.COMPARE_RESUME_MUTABLE)
    if changed:
        raise CliError(f"cannot change {changed[0].split(':')[0]!r} when resuming a comparison (folder vs command "
                       f"line: {changed[0].split(': ', 1)[1]}); keys a resumed compare may change: "
                       f"{', '.join(sorted(C.COMPARE_RESUME_MUTABLE - {'out', 'resume'}))}")
    if getattr(args, "out", None) and os.path.abspath(args.out) != os.path.abspath(folder):
        raise CliError("compare --resume continues in the folder it resumes; leave out --out")
    cfg.out = folder
    return cfg, read_finished(folder)


def cmd_compare(args) -> int:
    from .launch import distributed_scope
    from .optimizers import resolve_names
    from .train import run_many
    resume_dir = getattr(args, "resume", None)
    if resume_dir is None and getattr(args, "config", None):
        resume_dir = C.load_config_file(args.config).get("resume")
    finished = {}
    if resume_dir:
        cfg, finished = _compare_resume(args, resume_dir)
    else:
        cfg = resolve_config(args, "compare")
    if cfg.checkpoint_every:
        raise CliError("checkpoint_every: checkpoints apply to `curvfun train` (one optimizer); compare saves each "
                       "optimizer's results as soon as it ends (continue an interrupted one with --resume FOLDER)")
    names = resolve_names(cfg.optimizers)
    if not resume_dir and cfg.out:
        _refuse_held_run(cfg.out, "compare")
    with distributed_scope(cfg) as dctx:
        if dctx is not None:
            names = _check_distributable(names, explicit="all" not in cfg.optimizers)
        main = dctx is None or dctx.is_main
        hparams = _check_hparams(cfg, names)
        device, data = _prepare(cfg)
        run_dir = _make_run_dir(cfg.out) if main else None
        cfg.out, cfg.optimizers = run_dir, names
        cfg.hparams = {**cfg.hparams, **hparams}
        todo = [n for n in names if n not in finished]
        outputs = _Outputs(cfg, run_dir, names, {n: r for n, r in finished.items() if n in names}) if main else None
        if main:
            C.dump_config(cfg, os.path.join(run_dir, "config.yaml"))
            what = (f"; resuming {run_dir}: {len(names) - len(todo)} finished, running {', '.join(todo) or 'none'}"
                    if resume_dir else "")
            print(f"curvfun compare: {len(names)} optimizers ({', '.join(names)}) on {cfg.data}/{cfg.model}, "
                  f"{cfg.steps} steps of batch {cfg.batch_size}, seed {cfg.seed}, device {device}"
                  f"{_dist_note(dctx, cfg)}{what}", flush=True)
        try:
            _, errors = run_many(todo, cfg, data, device, run_dir=run_dir, on_result=outputs and outputs.add)
        except KeyboardInterrupt:
            if main:
                if outputs.results:  # the interrupt may have landed between two of the report files
                    outputs.write()
                done = [r.optimizer for r in outputs.ordered() if not r.status.startswith("error")]
                print(f"curvfun compare: interrupted; {len(done)} finished optimizer(s) ({', '.join(done) or 'none'}) "
                      f"are saved in {run_dir}; run the others with `curvfun compare --resume {run_dir}`",
                      file=sys.stderr)
            raise
        return _finish(outputs) if main else (1 if errors else 0)


def _resume_target(args, resume: dict):
    """``(folder, move_aside)``: the folder a resumed run continues in, ``--out`` (or ``out`` of --config)
    if given, else the run folder that holds the checkpoint (None: a new ``runs/<timestamp>``, for a
    loose checkpoint file). A folder holding another run is refused; with --force-resume its run
    files are to be moved aside first (``move_aside``)."""
    from .train import checkpoint_run_dir
    explicit = getattr(args, "out", None)
    if explicit is None and getattr(args, "config", None):
        explicit = C.load_config_file(args.config).get("out")
    home = checkpoint_run_dir(resume["path"])
    target = explicit or home
    if not target or not _held_run(target):
        return target, False
    held = _held_config(target)
    same_folder = home is not None and os.path.abspath(home) == os.path.abspath(target)
    if held is not None:
        diff = C.run_differences(held, resume["config"])
        problem = (f"its config.yaml differs from the checkpoint's ({'; '.join(diff)}: folder vs checkpoint)"
                   if diff else None)
    else:
        problem = None if same_folder else f"it holds {', '.join(_held_run(target))} of another run"
    if problem is None:
        return target, False
    if not getattr(args, "force_resume", False):
        raise CliError(f"run folder {target} holds another run than checkpoint {resume['path']}: {problem}. "
                       f"Resume into a new --out, or pass --force-resume to continue the checkpoint's run in "
                       f"{target} (that folder's run files are then moved to {target}/previous-<timestamp>/)")
    return target, True


def cmd_train(args) -> int:
    from .optimizers import get_spec
    from .train import load_checkpoint, run_many
    resume = None
    base = None
    resume_path = getattr(args, "resume", None)
    if resume_path is None and getattr(args, "config", None):
        resume_path = C.load_config_file(args.config).get("resume")
    if resume_path:
        resume = load_checkpoint(resume_path)
        base = dict(resume["config"])
    cfg = resolve_config(args, "train", base=base)
    if resume is not None:
        changed = [k for k, v in resume["config"].items()
                   if k not in C.RESUME_MUTABLE and getattr(cfg, k) != v]
        if changed:
            k = changed[0]
            raise CliError(f"cannot change {k!r} when resuming (the checkpoint has {resume['config'][k]!r}, "
                           f"got {getattr(cfg, k)!r}); keys a resumed run may change: "
                           f"{', '.join(sorted(C.RESUME_MUTABLE))}")
        if int(resume["step"]) > cfg.steps:
            raise CliError(f"checkpoint is at step {resume['step']}, beyond steps={cfg.steps}")
        cfg.resume = resume["path"]
        cfg.out, move_aside = _resume_target(args, resume)
    elif cfg.out:
        _refuse_held_run(cfg.out, "train")
    from .launch import distributed_scope
    get_spec(cfg.optimizer)
    with distributed_scope(cfg) as dctx:
        if dctx is not None:
            _check_distributable([cfg.optimizer], explicit=True)
        main = dctx is None or dctx.is_main
        hparams = _check_hparams(cfg, [cfg.optimizer])
        device, data = _prepare(cfg)
        if main and resume is not None and move_aside:
            aside = _move_aside(cfg.out)
            print(f"curvfun train: --force-resume: moved the run files of {cfg.out} to {aside}", file=sys.stderr)
        run_dir = _make_run_dir(cfg.out) if main else None
        cfg.out, cfg.optimizers = run_dir, [cfg.optimizer]
        cfg.hparams = {**cfg.hparams, **hparams}
        outputs = _Outputs(cfg, run_dir, [cfg.optimizer]) if main else None
        if main:
            C.dump_config(cfg, os.path.join(run_dir, "config.yaml"))
            what = f"resuming {resume['path']} at step {resume['step']}" if resume else "from scratch"
            print(f"curvfun train: {cfg.optimizer} on {cfg.data}/{cfg.model}, {cfg.steps} steps of batch "
                  f"{cfg.batch_size}, seed {cfg.seed}, device {device}, {what}{_dist_note(dctx, cfg)}", flush=True)
        try:
            _, errors = run_many([cfg.optimizer], cfg, data, device, run_dir=run_dir, resume=resume,
                                 on_result=outputs and outputs.add)
        except KeyboardInterrupt:
            if main and cfg.checkpoint_every and os.path.isdir(os.path.join(run_dir, "checkpoints")):
                print(f"curvfun train: interrupted; continue from the latest checkpoint with "
                      f"`curvfun train --resume {run_dir}`", file=sys.stderr)
            raise
        return _finish(outputs) if main else (1 if errors else 0)


def cmd_demo(args) -> int:
    import torch
    import curvfun
    psgn = getattr(curvfun, "per_sample_grad_norms", None)
    fisher = getattr(curvfun, "fisher", None)
    if psgn is None or fisher is None:
        missing = [n for n, f in (("per_sample_grad_norms", psgn), ("fisher", fisher)) if f is None]
        print(f"curvfun demo: this build of curvfun lacks {', '.join('curvfun.' + m for m in missing)} "
              "(the foundation functions); update curvfun and run again.", file=sys.stderr)
        return 1
    import torch.nn.functional as F
    from .data import load_digits_data
    from .models import MLP
    if args.batch_size < 1 or args.hidden < 1 or args.train_steps < 0:
        raise CliError("--batch-size and --hidden must be >= 1, --train-steps >= 0")
    data = load_digits_data()
    torch.manual_seed(args.seed)
    model = MLP(data.input_shape, 10, hidden=(args.hidden,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(args.train_steps):
        x, t = data.train_batch(step, 64, args.seed)
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()
    x, y = data.x_test[:args.batch_size], data.y_test[:args.batch_size]
    params = {k: v.detach() for k, v in model.named_parameters()}
    n_params = sum(p.numel() for p in params.values())
    print(f"MLP 64-{args.hidden}-10 ({n_params} parameters) after {args.train_steps} SGD steps on digits; "
          f"a test batch of {len(y)} samples\n")

    norms = psgn(model, params, x, y, loss="cross_entropy")
    ref = []
    for i in range(len(y)):  # plain autograd, one sample at a time
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        ref.append(torch.sqrt(sum((gi ** 2).sum() for gi in g)))
    ref = torch.stack(ref)
    print("per-sample gradient norms ||grad l_n||  (curvfun.per_sample_grad_norms)")
    for i in range(len(y)):
        print(f"  sample {i:3d}  label {int(y[i])}  norm {float(norms[i]):10.5f}")
    print(f"  max |difference| to a per-sample autograd loop: {float((norms - ref).abs().max()):.2e}\n")

    diag = fisher(model, params, x, y, loss="cross_entropy", fisher_type="exact", shape="diag")
    print("exact Fisher diagonal of the mean loss  (curvfun.fisher(..., fisher_type='exact', shape='diag'))")
    total = 0.0
    for name, d in diag.items():
        total += float(d.sum())
        top = torch.topk(d.flatten(), k=min(3, d.numel())).values
        print(f"  {name:<14} shape {str(list(d.shape)):<10} sum {float(d.sum()):10.5f}  "
              f"mean {float(d.mean()):.3e}  max {float(d.max()):.3e}  top3 {[round(float(v), 5) for v in top]}")
    ref_diag = {k: torch.zeros_like(v) for k, v in params.items()}
    names = [k for k, _ in model.named_parameters()]
    for i in range(len(y)):  # plain autograd: E_{c ~ p(c|x_n)} (grad log p_c)^2, averaged over n
        probs = torch.softmax(model(x[i:i + 1]), -1)[0].detach()
        for c in range(probs.numel()):
            logp = torch.log_softmax(model(x[i:i + 1]), -1)[0, c]
            for k, g in zip(names, torch.autograd.grad(logp, list(model.parameters()))):
                ref_diag[k] += probs[c] * g ** 2 / len(y)
    err = max(float((diag[k] - ref_diag[k]).abs().max()) for k in names)
    emp = float((ref ** 2).mean())
    print(f"  max |difference| to a plain-autograd exact Fisher diagonal: {err:.2e}")
    print(f"  trace of the exact Fisher: {total:.5f}; trace of the empirical Fisher (mean ||g_n||^2): {emp:.5f}")
    return 0


def cmd_list(args) -> int:
    from .data import DATASETS
    from .models import MODELS, model_arg_names
    from .optimizers import describe
    print("optimizers (`--optimizer NAME`, `--optimizers A,B`; [explicit only] = not in `compare` by default):")
    print(describe())
    print("\nmodels (`--model NAME`, arguments via --model-arg KEY=VALUE):")
    for name, (cls, task, _) in MODELS.items():
        print(f"  {name:<8} {task:<15} args: {', '.join(model_arg_names(name))}")
    print(f"\ndata sets (`--data NAME`): {', '.join(DATASETS)}")
    if args.keys:
        print("\nconfig keys (`--config FILE.yaml|json`):")
        for name in C.VALID_KEYS:
            print(f"  {name:<16} {_help(name)}")
    return 0


COMMANDS = {"compare": cmd_compare, "train": cmd_train, "demo": cmd_demo, "list": cmd_list}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with _command_scope():
            return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"curvfun {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvfun: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `curvfun list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a file that cannot be written (full disk, permissions) after the checks
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"curvfun {args.command}: error: {exc.strerror or exc}{where}; check the run folder (--out) is "
              f"writable and has space", file=sys.stderr)
        return 1
    except Exception as exc:
        from ..distributed import CurvfunDistributedError
        if not isinstance(exc, CurvfunDistributedError):
            raise
        print(f"curvfun {args.command}: error: {exc}", file=sys.stderr)
        return 1
