"""Data sets of the ``curvfun`` command, all offline.

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes), pixels scaled to
  [0, 1], shaped ``[N, 1, 8, 8]``; a fixed stratified 80/20 train/test split (1437 / 360)
  that does not depend on ``--seed``.
* ``cifar10``: the standard *python* pickle release (``cifar-10-python.tar.gz`` extracted):
  ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` in ``--data-dir`` (or in
  ``--data-dir/cifar-10-batches-py``), each a pickled dict with ``b'data'`` (uint8
  ``[n, 3072]``, rows of 1024 red, 1024 green, 1024 blue values) and ``b'labels'`` (n ints in
  0..9). Images are kept as uint8 and normalised per batch; ``--augment`` adds a random
  4-pixel-padded crop and a horizontal flip.
* ``wikitext2``: ``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens`` (word
  level) in ``--data-dir`` (or ``--data-dir/wikitext-2``). Each line is split on whitespace
  and ends with ``<eos>``; the vocabulary is built from the training file (plus ``<unk>``, to
  which unseen valid/test words map). Batches are contiguous sequences: the training stream is
  cut into ``batch_size`` equal rows and step ``s`` reads the next ``seq_len`` tokens of every
  row (targets shifted by one), wrapping around at the end.

Batches are a pure function of ``(seed, step)``: epoch ``e``'s order is ``randperm`` from a
generator seeded with ``(seed, e)``, augmentation from ``(seed, step)``. Hence a run resumed at
step ``k`` sees exactly the batches of an uninterrupted run, with no loader state to save.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .config import CliError

DATASETS = ("digits", "cifar10", "wikitext2")

CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_LAYOUT = ("expected layout (the python version of CIFAR-10, cifar-10-python.tar.gz extracted): "
                "DATA_DIR/data_batch_1 ... DATA_DIR/data_batch_5 and DATA_DIR/test_batch "
                "(or the same files under DATA_DIR/cifar-10-batches-py/), each a pickled dict with "
                "b'data': uint8 array [n, 3072] and b'labels': list of n ints in 0..9")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

WIKITEXT_FILES = ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
WIKITEXT_LAYOUT = ("expected layout (WikiText-2, word level): DATA_DIR/wiki.train.tokens, "
                   "DATA_DIR/wiki.valid.tokens and DATA_DIR/wiki.test.tokens (or the same files under "
                   "DATA_DIR/wikitext-2/), UTF-8 text, whitespace-separated tokens, one paragraph per line")


class DataError(CliError):
    """A missing or malformed data file; the message names the file and the expected layout."""


def _seeded(*numbers: int) -> torch.Generator:
    g = torch.Generator()
    s = 0
    for n in numbers:  # a simple deterministic mix of the integers
        s = (s * 1_000_003 + int(n) + 0x9E3779B9) % (2 ** 63 - 1)
    g.manual_seed(s)
    return g


@dataclass
class ImageClassification:
    """Images as float or uint8 tensors ``[N, C, H, W]`` and integer labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: Optional[Tuple[float, ...]] = None  # set for uint8 storage: normalise per batch
    std: Optional[Tuple[float, ...]] = None
    augment: bool = False
    task: str = "classification"
    _perm_cache: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def info(self) -> dict:
        return {"task": self.task, "input_shape": self.input_shape, "num_classes": self.num_classes}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Stored images -> float model inputs (uint8 storage is scaled and normalised)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.float()

    def steps_per_epoch(self, batch_size: int) -> int:
        n = len(self.y_train)
        if batch_size > n:
            raise CliError(f"batch_size {batch_size} exceeds the {n} training samples of {self.name}")
        return n // batch_size

    def train_batch(self, step: int, batch_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, j = divmod(step, per_epoch)
        key = (seed, epoch)
        if key not in self._perm_cache:
            self._perm_cache.clear()
            self._perm_cache[key] = torch.randperm(len(self.y_train), generator=_seeded(seed, epoch))
        idx = self._perm_cache[key][j * batch_size:(j + 1) * batch_size]
        x = self.prepare(self.x_train[idx])
        if self.augment:
            x = augment_images(x, _seeded(seed, step, 7))
        return x, self.y_train[idx]

    def eval_sets(self, train_eval_size: int, test_eval_size: int):
        """(name, x, y) of the fixed train subset and the test set used for evaluation."""
        n_tr = len(self.y_train) if train_eval_size <= 0 else min(train_eval_size, len(self.y_train))
        idx = torch.randperm(len(self.y_train), generator=_seeded(12345))[:n_tr].sort().values
        n_te = len(self.y_test) if test_eval_size <= 0 else min(test_eval_size, len(self.y_test))
        return (("train", self.x_train[idx], self.y_train[idx]),
                ("test", self.x_test[:n_te], self.y_test[:n_te]))


def augment_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding by max(1, H // 8) pixels, and a random horizontal flip."""
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # [n, h]
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # [n, w]
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    out = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1),
                 rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    return out.contiguous()


# ----------------------------------------------------------------------------- digits

def load_digits_data(augment: bool = False) -> ImageClassification:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:  # pragma: no cover - sklearn is a dependency of the [main] extra
        raise CliError("the digits data set needs scikit-learn: pip install 'curvfun[main]'") from None
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32).div_(16.0).view(-1, 1, 8, 8)
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_tr, idx_te = train_test_split(list(range(len(y))), test_size=0.2, random_state=0, stratify=bunch.target)
    idx_tr, idx_te = torch.tensor(idx_tr), torch.tensor(idx_te)
    return ImageClassification("digits", x[idx_tr], y[idx_tr], x[idx_te], y[idx_te], num_classes=10, augment=augment)


# ----------------------------------------------------------------------------- CIFAR-10

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (the CIFAR files hold nothing else)."""

    _ALLOWED = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}
    _MODULES = {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                "numpy._core.numeric"}  # numpy 1 and 2

    def find_class(self, module, name):
        if (module in self._MODULES and name in self._ALLOWED) or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)  # _codecs.encode: bytes in protocol-2 pickles of Python 3
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are expected)")


def _cifar_dir(data_dir: Optional[str]) -> str:
    if not data_dir:
        raise DataError("cifar10 needs --data-dir (or data_dir in the config); " + CIFAR_LAYOUT)
    if not os.path.isdir(data_dir):
        raise DataError(f"CIFAR-10 data directory not found: {data_dir}; " + CIFAR_LAYOUT)
    sub = os.path.join(data_dir, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(data_dir, CIFAR_TEST_FILE)) and os.path.isdir(sub):
        return sub
    return data_dir


def read_cifar_batch(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR-10 pickle file -> (uint8 images [n, 3, 32, 32], labels [n])."""
    import numpy as np
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file not found: {path}; " + CIFAR_LAYOUT)
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"CIFAR-10 file {path} is not a readable python pickle ({exc}); " + CIFAR_LAYOUT) from None
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        keys = sorted(obj.keys()) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"CIFAR-10 file {path} must hold a dict with keys b'data' and b'labels', got {keys}; "
                        + CIFAR_LAYOUT)
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR-10 file {path}: b'data' must be a uint8 array [n, 3072], "
                        f"got {data.dtype} {list(data.shape)}; " + CIFAR_LAYOUT)
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"CIFAR-10 file {path}: b'labels' must hold {len(data)} labels (one per row of b'data'), "
                        f"got shape {list(labels.shape)}; " + CIFAR_LAYOUT)
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9):
        raise DataError(f"CIFAR-10 file {path}: labels must be integers in 0..9; " + CIFAR_LAYOUT)
    x = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_cifar10(data_dir: Optional[str], augment: bool = False) -> ImageClassification:
    root = _cifar_dir(data_dir)
    missing = [f for f in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,) if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DataError(f"CIFAR-10 file not found: {os.path.join(root, missing[0])}"
                        + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
                        + "; " + CIFAR_LAYOUT)
    parts = [read_cifar_batch(os.path.join(root, f)) for f in CIFAR_TRAIN_FILES]
    x_te, y_te = read_cifar_batch(os.path.join(root, CIFAR_TEST_FILE))
    x_tr = torch.cat([p[0] for p in parts])
    y_tr = torch.cat([p[1] for p in parts])
    return ImageClassification("cifar10", x_tr, y_tr, x_te, y_te, num_classes=10,
                               mean=CIFAR_MEAN, std=CIFAR_STD, augment=augment)


# ----------------------------------------------------------------------------- WikiText-2

@dataclass
class LanguageModelling:
    """Token streams (1-D LongTensors) and the word-level vocabulary."""

    name: str
    vocab: List[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    seq_len: int
    task: str = "lm"

    @property
    def info(self) -> dict:
        return {"task": self.task, "vocab_size": len(self.vocab), "seq_len": self.seq_len}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _rows(self, stream: torch.Tensor, batch_size: int, what: str) -> torch.Tensor:
        n = len(stream) // batch_size
        if n < self.seq_len + 1:
            raise CliError(f"{self.name}: the {what} stream has {len(stream)} tokens, too few for batch_size "
                           f"{batch_size} x (seq_len {self.seq_len} + 1)")
        return stream[: n * batch_size].view(batch_size, n)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(self.train, batch_size, "training")
        chunks = (rows.shape[1] - 1) // self.seq_len
        i = (step % chunks) * self.seq_len
        return rows[:, i:i + self.seq_len], rows[:, i + 1:i + 1 + self.seq_len]

    def _sequences(self, stream: torch.Tensor, max_sequences: int):
        n = (len(stream) - 1) // self.seq_len
        if max_sequences > 0:
            n = min(n, max_sequences)
        if n < 1:
            raise CliError(f"{self.name}: an evaluation stream has {len(stream)} tokens, fewer than seq_len + 1")
        x = stream[: n * self.seq_len].view(n, self.seq_len)
        y = stream[1: n * self.seq_len + 1].view(n, self.seq_len)
        return x, y

    def eval_sets(self, train_eval_size: int, test_eval_size: int):
        x_tr, y_tr = self._sequences(self.train, train_eval_size)
        x_te, y_te = self._sequences(self.test, test_eval_size)
        return (("train", x_tr, y_tr), ("test", x_te, y_te))


def _wikitext_dir(data_dir: Optional[str]) -> str:
    if not data_dir:
        raise DataError("wikitext2 needs --data-dir (or data_dir in the config); " + WIKITEXT_LAYOUT)
    if not os.path.isdir(data_dir):
        raise DataError(f"WikiText-2 data directory not found: {data_dir}; " + WIKITEXT_LAYOUT)
    sub = os.path.join(data_dir, "wikitext-2")
    if not os.path.exists(os.path.join(data_dir, WIKITEXT_FILES[0])) and os.path.isdir(sub):
        return sub
    return data_dir


def read_tokens(path: str) -> List[str]:
    """Whitespace tokens of a WikiText file, ``<eos>`` after every line."""
    if not os.path.isfile(path):
        raise DataError(f"WikiText-2 file not found: {path}; " + WIKITEXT_LAYOUT)
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"WikiText-2 file {path} is not UTF-8 text ({exc}); " + WIKITEXT_LAYOUT) from None
    tokens = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append("<eos>")
    if not any(t != "<eos>" for t in tokens):
        raise DataError(f"WikiText-2 file {path} holds no tokens; " + WIKITEXT_LAYOUT)
    return tokens


def load_wikitext2(data_dir: Optional[str], seq_len: int) -> LanguageModelling:
    root = _wikitext_dir(data_dir)
    missing = [f for f in WIKITEXT_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise DataError(f"WikiText-2 file not found: {os.path.join(root, missing[0])}"
                        + (f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else "")
                        + "; " + WIKITEXT_LAYOUT)
    train, valid, test = (read_tokens(os.path.join(root, f)) for f in WIKITEXT_FILES)
    vocab: Dict[str, int] = {}
    for tok in ["<unk>", "<eos>"] + train:
        if tok not in vocab:
            vocab[tok] = len(vocab)
    unk = vocab["<unk>"]

    def encode(tokens):
        return torch.tensor([vocab.get(t, unk) for t in tokens], dtype=torch.long)

    return LanguageModelling("wikitext2", list(vocab), encode(train), encode(valid), encode(test), seq_len=seq_len)


# ----------------------------------------------------------------------------- entry point

def load_dataset(name: str, data_dir: Optional[str] = None, augment: bool = False, seq_len: int = 35):
    if name == "digits":
        return load_digits_data(augment=augment)
    if name == "cifar10":
        return load_cifar10(data_dir, augment=augment)
    if name == "wikitext2":
        if augment:
            raise CliError("augment applies to image data only, not to wikitext2")
        return load_wikitext2(data_dir, seq_len=seq_len)
    raise CliError(f"unknown data set {name!r}; valid data sets: {', '.join(DATASETS)}")
