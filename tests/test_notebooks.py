"""Execute the notebooks of ``notebooks/`` end to end on a headless Jupyter kernel.

Each notebook asserts what it computes (Gershgorin discs contain the eigenvalues, K-FAC ends at
the minimum of the 2-D surface, curvfun matches the dense reference, ...), so a notebook that
runs to the end has passed its own checks; a failing cell fails the test with its traceback.

How the kernel is found: a kernel spec named ``python3`` is written to a temporary directory put
first on ``JUPYTER_PATH``, with ``sys.executable`` as its interpreter, so the notebooks run in the
interpreter that runs pytest whatever kernel specs the machine has (none, or a user-level
``python3`` pointing at another Python). It needs ``ipykernel``, ``nbclient`` and ``nbformat``
(the ``notebooks`` extra: ``pip install -e ".[test,main,notebooks]"``). The kernel runs in a
temporary working directory with ``MPLBACKEND=Agg`` and this checkout's ``src`` first on
``PYTHONPATH``.

The committed notebooks carry no outputs. Before running, the test prepends one cell to the copy it
executes (never to the file) that makes ``plt.show()`` draw each open figure on the Agg canvas
and close it, so errors raised while drawing a figure are caught too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

try:
    import nbformat
    from nbclient import NotebookClient
except ImportError as exc:  # pragma: no cover - the notebooks extra is part of the CI install
    raise ImportError(
        "tests/test_notebooks.py needs the notebooks extra (nbclient, nbformat, ipykernel): "
        "pip install -e '.[test,main,notebooks]'"
    ) from exc

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["kronecker_factors.ipynb", "loss_landscape.ipynb", "quickstart.ipynb"]

#: prepended to the executed copy only: draw every figure at plt.show(), then close it
RENDER_CELL = """\
import matplotlib
import matplotlib.pyplot as plt
assert matplotlib.get_backend().lower() == "agg", matplotlib.get_backend()
def _draw_and_close(*args, **kwargs):
    for num in plt.get_fignums():
        plt.figure(num).canvas.draw()
    plt.close("all")
plt.show = _draw_and_close
"""


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A ``kernels/python3`` spec that launches ipykernel with this interpreter."""
    try:
        import ipykernel  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the notebook tests need ipykernel: pip install -e '.[notebooks]'") from exc
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (curvfun tests)",
        "language": "python",
        "metadata": {"debugger": False},
    }))
    return root


def _load(name: str):
    path = NOTEBOOK_DIR / name
    assert path.is_file(), f"missing notebook {path}"
    return nbformat.read(str(path), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
    """Valid nbformat, the python3 kernel, and no outputs or execution counts in the file."""
    nb = _load(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {i} has committed outputs"
            assert cell.execution_count is None, f"{name}: cell {i} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, kernel_dir, tmp_path, monkeypatch):
    nb = _load(name)
    nb.cells.insert(0, nbformat.v4.new_code_cell(RENDER_CELL))
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(kernel_dir), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silence the debugger's frozen-modules note
    client = NotebookClient(
        nb,
        timeout=300,
        startup_timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell's traceback) if a cell fails
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in ran), "a code cell did not run"
    print(f"{name}: {len(ran) - 1} code cells in {elapsed:.1f} s")
