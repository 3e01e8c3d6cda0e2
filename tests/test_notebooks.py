"""The executed notebooks still run: each is executed in reduced mode (small fresh capture)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def reduced_env(tmp_path_factory):
    data = tmp_path_factory.mktemp("nb") / "capture"
    old = {k: os.environ.get(k) for k in ("POISE_NB_DATA", "POISE_NB_REDUCED", "POISE_NB_RUN")}
    os.environ.update({"POISE_NB_DATA": str(data), "POISE_NB_REDUCED": "1"})
    os.environ.pop("POISE_NB_RUN", None)
    yield data
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_there_are_three_executed_notebooks():
    import nbformat

    assert [p.name for p in NOTEBOOKS] == ["01_layer_sweep.ipynb", "02_calibration.ipynb",
                                           "03_transfer.ipynb"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.get("outputs") for c in code), f"{path.name} is not executed"
        assert not [o for c in code for o in c.outputs if o.output_type == "error"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_in_reduced_mode(path, reduced_env):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    kinds = {k for o in outputs for k in o.get("data", {})}
    assert any("plotly" in k or k == "text/html" for k in kinds), kinds
