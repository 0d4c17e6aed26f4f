"""The research notebooks (notebooks/*.ipynb) run top to bottom as a person opens them (from
notebooks/, in a kernel of this Python, with this checkout's neva first on the path) without an
error, and are committed without outputs. The suite never depends on a trained run: NEVA_RUN points
at a folder that does not exist, so notebooks 2 and 5 take their tiny-model path."""
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there_without_outputs():
    assert [p.stem.split("_")[0] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{p.name}: cells {dirty} hold outputs; clear them before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("NEVA_RUN", str(tmp_path / "no_run"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))          # what the notebooks generate goes where pytest cleans
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import neva; print(neva.__file__)"))
    t0 = time.time()
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    print(f"{path.name}: {time.time() - t0:.1f} s")
    assert nb.cells[0].outputs[0]["text"].strip() == str(ROOT / "neva" / "__init__.py")
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.get("output_type") in ("display_data", "execute_result") and {"image/png", "text/html"} & set(o["data"])]
    assert shown, f"{path.name} ends in nothing a person looks at (no plot, image or table)"
