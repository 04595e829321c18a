"""No loader in ``src/`` may unpickle arbitrary objects or evaluate text: a scan of the sources
for the calls that can run code carried by a file (so it stays that way)."""

from __future__ import annotations

import os
import re

import curvfun

SRC = os.path.dirname(os.path.abspath(curvfun.__file__))

#: (pattern, why) of calls that run code from a file or string
UNSAFE = [
    (re.compile(r"weights_only\s*=\s*False"), "torch.load(weights_only=False) unpickles arbitrary objects"),
    (re.compile(r"\b(c?pickle|dill|joblib|marshal|shelve|jsonpickle)\.loads?\s*\("), "unrestricted unpickling"),
    (re.compile(r"\byaml\.(unsafe_load|full_load|load_all)\s*\("), "unsafe YAML"),
    (re.compile(r"\byaml\.load\s*\((?![^)]*SafeLoader)"), "yaml.load without SafeLoader"),
    (re.compile(r"Loader\s*=\s*yaml\.(Unsafe|Full)?Loader\b"), "unsafe YAML loader"),
    (re.compile(r"(?<![\w.])(?<!def )(eval|exec)\s*\("), "eval/exec of text"),
    (re.compile(r"(?<![\w.])__import__\s*\("), "dynamic import of a name from data"),
    (re.compile(r"\bnp\.load\s*\([^)]*allow_pickle\s*=\s*True"), "numpy load with pickles"),
]
TORCH_LOAD = re.compile(r"\btorch\.load\s*\(")


def scan(text: str) -> list:
    """``(line number, why)`` of every unsafe call in a source text (comments are skipped)."""
    found = []
    for i, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        for pattern, why in UNSAFE:
            if pattern.search(code):
                found.append((i, why))
        m = TORCH_LOAD.search(code)
        if m:  # the call's arguments (up to 3 lines) must say weights_only=True
            call = " ".join(text.splitlines()[i - 1:i + 2])[m.start():]
            if not re.search(r"weights_only\s*=\s*True", call.split(")")[0] + ")"):
                found.append((i, "torch.load without weights_only=True"))
    return found


def test_the_scan_finds_each_unsafe_call():
    bad = ["torch.load(p, weights_only=False)", "torch.load(p)", "pickle.load(fh)", "pickle.loads(b)",
           "yaml.load(text)", "yaml.unsafe_load(text)", "yaml.load(t, Loader=yaml.Loader)", "eval(s)",
           "exec(code)", "x = __import__(name)", "np.load(f, allow_pickle=True)"]
    for line in bad:
        assert scan(line), line
    good = ["torch.load(p, map_location='cpu', weights_only=True)", "yaml.safe_load(text)",
            "yaml.load(t, Loader=yaml.SafeLoader)", "model.eval()", "def eval(self, value):", "v.eval(root)",
            "_ArrayOnlyUnpickler(fh).load()", "# eval(s) in a comment"]
    for line in good:
        assert not scan(line), line


def test_no_unsafe_loading_in_src():
    found = []
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                with open(path, encoding="utf-8") as fh:
                    found += [f"{os.path.relpath(path, SRC)}:{i}: {why}" for i, why in scan(fh.read())]
    assert not found, "unsafe loading in src/:\n" + "\n".join(found)


def test_the_only_unpickler_restricts_its_globals():
    """The CIFAR reader's Unpickler overrides find_class (the one pickle reader in src/)."""
    from curvfun.cli.data import _ArrayOnlyUnpickler
    import pickle
    users = []
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(root, f), encoding="utf-8") as fh:
                    if "pickle.Unpickler" in fh.read():
                        users.append(f)
    assert users == ["data.py"]
    assert _ArrayOnlyUnpickler.find_class is not pickle.Unpickler.find_class
