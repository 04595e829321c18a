"""Run configuration of the ``curvfun`` command: one flat schema, defaults < config file < flags.

Every key below may appear in a ``--config FILE.yaml|json`` mapping; most also have a flag
(``batch_size`` <-> ``--batch-size``). Precedence is fixed: the built-in defaults, then the
config file, then the flags given on the command line. A key that is not in the schema is an
error that names it and lists the valid keys; a value of the wrong type is an error too.
The resolved configuration is written to every run folder as ``config.yaml`` and can be fed
back with ``--config`` to repeat the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


class CliError(Exception):
    """A user error: bad flag, config key, name or file. Printed without a traceback."""


@dataclass
class Config:
    # data and model
    data: str = field(default="digits", metadata={"help": "data set: digits | cifar10 | wikitext2"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "directory of the CIFAR-10 / WikiText-2 files"})
    augment: bool = field(default=False, metadata={"help": "random crop + horizontal flip (image data)"})
    model: str = field(default="mlp", metadata={"help": "model: mlp | cnn | resnet | gpt"})
    model_args: dict = field(default_factory=dict, metadata={"help": "keyword arguments of the model (e.g. hidden: [128])"})
    # optimizers
    optimizer: str = field(default="sgd", metadata={"help": "optimizer of `curvfun train`"})
    optimizers: list = field(default_factory=lambda: ["all"],
                             metadata={"help": "optimizers of `curvfun compare` ('all' = every default one available)"})
    hparams: dict = field(default_factory=dict,
                          metadata={"help": "per-optimizer hyper-parameter overrides, {name: {key: value}}"})
    # budget
    steps: int = field(default=300, metadata={"help": "optimizer steps per run"})
    batch_size: int = field(default=64, metadata={"help": "training batch size (sequences for language models)"})
    seq_len: int = field(default=35, metadata={"help": "tokens per sequence (language modelling)"})
    # evaluation
    eval_every: int = field(default=25, metadata={"help": "evaluate every this many steps (and at the end)"})
    eval_batch_size: int = field(default=1000, metadata={"help": "batch size of evaluation"})
    train_eval_size: int = field(default=2048,
                                 metadata={"help": "fixed training subset for the reported train loss (samples / sequences; 0 = all)"})
    test_eval_size: int = field(default=0, metadata={"help": "test samples / sequences evaluated (0 = all)"})
    # execution
    seed: int = field(default=0, metadata={"help": "random seed (model init, data order, augmentation, sampling)"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto"})
    amp: bool = field(default=False, metadata={"help": "bfloat16 autocast on CUDA; ignored with a warning on CPU"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = auto: 1 on digits, torch's default otherwise)"})
    mem_probe_steps: int = field(default=3, metadata={"help": "steps of the CPU peak-memory probe (0 = off)"})
    progress: bool = field(default=True, metadata={"help": "show tqdm progress bars"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})
    # data-parallel (torchrun)
    distributed: Optional[bool] = field(
        default=None, metadata={"help": "data-parallel over torch.distributed ranks (null = auto: on when torchrun's "
                                        "RANK/WORLD_SIZE/LOCAL_RANK are set)"})
    dist_backend: Optional[str] = field(default=None, metadata={"help": "process-group backend (null = gloo on CPU, nccl on CUDA)"})
    dist_timeout: int = field(default=300, metadata={"help": "seconds a collective may wait for the other ranks"})
    ddp: bool = field(default=False, metadata={"help": "wrap the model in DistributedDataParallel (distributed runs)"})
    # outputs and checkpoints
    out: Optional[str] = field(default=None, metadata={"help": "run folder (default runs/<timestamp>)"})
    checkpoint_every: int = field(default=0, metadata={"help": "save a checkpoint every this many steps (0 = off; train)"})
    resume: Optional[str] = field(default=None, metadata={"help": "checkpoint file (or run folder) to resume from (train)"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: keys a resumed run may change; every other key must match the checkpoint's.
RESUME_MUTABLE = frozenset({"steps", "out", "checkpoint_every", "eval_every", "progress", "plots", "device",
                            "threads", "mem_probe_steps", "resume", "eval_batch_size", "amp", "optimizers",
                            "distributed", "dist_backend", "dist_timeout", "ddp"})

#: keys a resumed ``compare`` may change (everything else would make its rows incomparable).
COMPARE_RESUME_MUTABLE = frozenset({"out", "resume", "progress", "plots", "threads", "device", "mem_probe_steps",
                                    "eval_batch_size", "distributed", "dist_backend", "dist_timeout"})

#: the files and folders of a run folder (one that holds any of them holds a run)
RUN_FILES = ("config.yaml", "results.md", "results.json", "metrics.csv", "errors.log", "checkpoints")

_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
VALID_KEYS = tuple(_FIELDS)


def _expected_kind(name: str) -> str:
    f = _FIELDS[name]
    ann = str(f.type)
    for kind in ("bool", "int", "float", "dict", "list", "str"):
        if kind in ann:
            return kind
    raise AssertionError(ann)


def coerce(name: str, value: Any, source: str = "config") -> Any:
    """Check (and lightly convert) one value against the schema."""
    if name not in _FIELDS:
        raise CliError(f"unknown config key {name!r} in {source}; valid keys: {', '.join(VALID_KEYS)}")
    kind = _expected_kind(name)
    optional = "Optional" in str(_FIELDS[name].type)
    if value is None and optional:
        return None
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "dict": isinstance(value, Mapping),
        "list": isinstance(value, (list, tuple)),
        "str": isinstance(value, str),
    }[kind]
    if kind == "list" and isinstance(value, str):  # "sgd,adam" is accepted for lists
        value, ok = [v.strip() for v in value.split(",") if v.strip()], True
    if not ok:
        raise CliError(f"config key {name!r} in {source} must be {'a ' + kind if kind != 'int' else 'an int'}"
                       f"{' or null' if optional else ''}, got {value!r}")
    if kind == "dict":
        value = {str(k): (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()}
    if kind == "list":
        value = list(value)
    return value


def load_config_file(path: str) -> dict:
    """Read a YAML or JSON mapping; return it validated against the schema."""
    if not os.path.isfile(path):
        raise CliError(f"config file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if ext in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        elif ext == ".json":
            raw = json.loads(text)
        else:
            raise CliError(f"config file {path} must end in .yaml, .yml or .json")
    except CliError:
        raise
    except Exception as exc:  # parse errors of either format
        raise CliError(f"could not parse config file {path}: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise CliError(f"config file {path} must hold a mapping of keys to values, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        out[name] = coerce(name, value, source=path)
    return out


def validate(cfg: Config) -> Config:
    """Range checks that do not depend on the registries."""
    def positive(name, allow_zero=False):
        v = getattr(cfg, name)
        if v < 0 or (v == 0 and not allow_zero):
            raise CliError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batch_size", "dist_timeout"):
        positive(name)
    for name in ("train_eval_size", "test_eval_size", "threads", "mem_probe_steps", "checkpoint_every"):
        positive(name, allow_zero=True)
    if cfg.dist_backend is not None and cfg.dist_backend not in ("gloo", "nccl", "mpi", "ucc"):
        raise CliError(f"dist_backend must be one of gloo, nccl, mpi, ucc (or null for the default), got {cfg.dist_backend!r}")
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise CliError(f"device must be one of cpu, cuda, cuda:N, auto; got {cfg.device!r}")
    for name, hp in cfg.hparams.items():
        if not isinstance(hp, Mapping):
            raise CliError(f"hparams[{name!r}] must be a mapping of hyper-parameter names to values, got {hp!r}")
    return cfg


def build_config(file_values: Optional[Mapping[str, Any]] = None, flag_values: Optional[Mapping[str, Any]] = None,
                 base: Optional[Mapping[str, Any]] = None) -> Config:
    """defaults (or ``base``) < file values < flag values; ``hparams`` and ``model_args`` merge per key."""
    values = Config().to_dict() if base is None else dict(base)
    for layer, source in ((file_values or {}, "config file"), (flag_values or {}, "command line")):
        for key, value in layer.items():
            value = coerce(key, value, source=source)
            if key == "hparams":
                merged = {k: dict(v) for k, v in values.get("hparams", {}).items()}
                for opt, hp in value.items():
                    merged.setdefault(opt, {}).update(hp)
                value = merged
            elif key == "model_args":
                value = {**values.get("model_args", {}), **value}
            values[key] = value
    return validate(Config(**values))


def dump_config(cfg: Config, path: str) -> None:
    """The resolved config as YAML (atomically), without ``out`` and ``resume``: the run folder is
    wherever the file lies, so a copied or moved folder stays self-contained."""
    import yaml
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump({**cfg.to_dict(), "out": None, "resume": None}, fh, sort_keys=False)
    os.replace(tmp, path)


def run_differences(a: Mapping[str, Any], b: Mapping[str, Any], mutable=RESUME_MUTABLE) -> list:
    """The keys outside ``mutable`` on which two configs of runs differ, as ``"key: A vs B"``."""
    def norm(v):
        return json.loads(json.dumps(v, sort_keys=True, default=str))
    out = []
    for key in VALID_KEYS:
        if key in mutable or (key not in a and key not in b):
            continue
        va, vb = norm(a.get(key)), norm(b.get(key))
        if va != vb:
            out.append(f"{key}: {va!r} vs {vb!r}")
    return out
