"""The notebooks run: each is executed with nbclient in quick mode (temp data and a 1-step tiny checkpoint).

A cell that raises fails its test; the notebooks must show what they promise (pictures inline, a GIF in the
sampling notebook) and be committed without outputs.
"""

from __future__ import annotations

import base64
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "python3"  # ipykernel's own spec (installed into the venv with ipykernel, or its built-in fallback)
PICTURES = {"01_data_and_masks.ipynb": 6, "02_sampling.ipynb": 7, "03_evaluation.ipynb": 3}  # inline PNGs at least


def _mimes(nb: nbformat.NotebookNode) -> list[str]:
    return [mime for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
            for mime in out.get("data", {})]


def test_three_notebooks_committed_clean():
    assert [p.name for p in NOTEBOOKS] == ["01_data_and_masks.ipynb", "02_sampling.ipynb", "03_evaluation.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"
        assert "from mardini" in "".join(c.source for c in nb.cells), f"{path.name} must use the package"


def test_the_committed_notebooks_are_what_build_py_writes():
    """``notebooks/build.py`` is where the cells are edited: a cell added to a notebook alone would be lost at the
    next rebuild, so the two must agree cell for cell."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebooks_build", ROOT / "notebooks" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, cells in build.NOTEBOOKS.items():
        committed = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        built = build.build(cells)
        assert [(c.cell_type, c.source, c.get("id")) for c in committed.cells] == \
               [(c.cell_type, c.source, c.get("id")) for c in built.cells], f"{name}: run python notebooks/build.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, monkeypatch, tmp_path):
    assert KERNEL in KernelSpecManager().find_kernel_specs(), "no python3 kernel: pip install ipykernel"
    monkeypatch.setenv("MARDINI_NOTEBOOK_QUICK", "1")  # the kernel inherits it: temp data, tiny checkpoint
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # ... and its temp folders land here, which pytest prunes
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [out for cell in nb.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
    mimes = _mimes(nb)
    assert mimes.count("image/png") >= PICTURES[path.name], f"{path.name} shows too few pictures: {mimes}"
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "quick mode: True" in text
    assert list(tmp_path.glob("mardini_*")), "quick mode's temp folders are not under TMPDIR"
    if path.name == "02_sampling.ipynb":
        gifs = [out["data"]["image/gif"] for cell in nb.cells for out in cell.get("outputs", [])
                if "image/gif" in out.get("data", {})]
        assert len(gifs) == 6, "one GIF per task"  # generate, interpolate, i2v, expand, long video, slow motion
        assert all(base64.b64decode(g)[:6] in (b"GIF87a", b"GIF89a") for g in gifs)
        assert "UNTRAINED" in text  # says plainly that the stand-in samples noise
    if path.name == "03_evaluation.ipynb":
        assert "linear_blend" in text or "text/markdown" in mimes
        shown = "".join(out["data"]["text/markdown"] for cell in nb.cells for out in cell.get("outputs", [])
                        if "text/markdown" in out.get("data", {}))
        assert "| gap (frames) |" in shown and "| 4 |" in shown  # where the objects are lost, gaps 1-4


def test_evaluation_notebook_follows_the_checkpoint_window(monkeypatch, tmp_path):
    """Notebook 03 evaluates at the checkpoint's window (here a 5-frame stand-in), not a hard-coded 9 frames."""
    monkeypatch.setenv("MARDINI_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's temp folders: pruned by pytest
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(ROOT / "notebooks" / "03_evaluation.ipynb", as_version=4)
    five = nbformat.v4.new_code_cell(
        "import functools\n"
        "testing.checkpoint_or_tiny = functools.partial(testing.checkpoint_or_tiny, frames=5)  # a 5-frame window"
    )
    nb.cells.insert(2, five)  # after the setup cell, before the checkpoint is made
    NotebookClient(nb, timeout=300, kernel_name=KERNEL, resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [f"{out['ename']}: {out['evalue']}" for cell in nb.cells for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors, errors
    text = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "window 5 frames" in text
    shown = "".join(out["data"]["text/markdown"] for cell in nb.cells for out in cell.get("outputs", [])
                    if "text/markdown" in out.get("data", {}))
    table = shown.split("| gap (frames) |")[-1].splitlines()[2:]  # the rows of the by-gap table
    assert [row.split("|")[1].strip() for row in table if row.startswith("|")] == ["1", "2"]  # 5 frames: gaps 1-2
