"""Executes every notebook in notebooks/ top to bottom (nbclient), as a reader would run it."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# These train a toy run (~45 s on an idle 2-core CPU); the others take seconds.
TRAINING = ("quickstart.ipynb", "reading_metrics.ipynb")
CASES = [
    pytest.param(p, id=p.name, marks=[pytest.mark.slow] if p.name in TRAINING else [])
    for p in NOTEBOOKS
]


@pytest.mark.parametrize("path", CASES)
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{path.name}: clear the outputs before committing"
    )
    # The kernel inherits this environment: one CPU device (conftest sets 8 fake ones for the
    # mesh tests), no run directory from the caller's shell.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("APO_RUN_DIR", raising=False)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
