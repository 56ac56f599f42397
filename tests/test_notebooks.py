"""The Colab notebooks: each runs top to bottom in a fresh kernel, and each is committed without outputs.

Every notebook is executed by nbclient (a cell error or a cell past `CELL_TIMEOUT` fails the test) with the
kernel's working directory in a temporary folder, so what a notebook writes (`results/notebooks/...`) stays out
of the checkout, and with this checkout first on `PYTHONPATH`, so the kernel and the processes it starts import
the code under test.
"""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds; a whole notebook takes about a minute or two on a 2-core CPU


def test_the_notebooks_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01_speculative_decoding.ipynb", "02_training_draft_heads.ipynb",
                                           "03_reproducing_a_table.ipynb", "04_scaling_out.ipynb"]


def test_committed_without_outputs():
    """No outputs, execution counts or run metadata: exactly what nbstripout leaves (`nbstripout notebooks/*.ipynb`
    strips them)."""
    proc = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *map(str, NOTEBOOKS)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"notebooks with outputs; run `nbstripout notebooks/*.ipynb`:\n{proc.stdout}"


def test_colab_links_point_at_the_repository():
    """Each notebook opens with its own "Open in Colab" link, and its set-up cell clones the repository named in
    pyproject.toml's [project.urls]."""
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        link = f"https://colab.research.google.com/github/{repo.removeprefix('https://github.com/')}/blob/main/" \
               f"notebooks/{path.name}"
        assert cells[0].cell_type == "markdown" and f"]({link})" in cells[0].source, path.name
        setup = cells[1].source
        assert cells[1].cell_type == "code" and f'REPO = "{repo}"' in setup and "scripts/setup.sh" in setup, path.name


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError (the cell and its traceback) on any error
