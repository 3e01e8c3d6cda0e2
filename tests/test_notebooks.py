"""The probe-study notebooks: in sync with their sources, saved with outputs, and executable.

Each notebook's source is notebooks/NN_<name>.py (jupytext percent format); notebooks/build.py
turns it into the .ipynb. The slow tests build each source and run it in CI's reduced mode
(POISE_NB_REDUCED=1: a capture of 72 rollouts made fresh in a temporary folder, small settings)
in memory, so a notebook cannot rot silently; the committed files are never written.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
PLOTLY = "application/vnd.plotly.v1+json"

#: Cells (by tag) that must show a table (HTML) or a Plotly figure, per notebook.
KEY_OUTPUTS = {
    "01_layer_sweep": {"capture": "text/html", "sweep": PLOTLY, "sweep-table": "text/html",
                       "best": "text/markdown", "ablation-table": "text/html",
                       "within-domain": "text/html", "interpretation": "text/markdown"},
    "02_calibration": {"setting": "text/markdown", "ece-table": "text/html",
                       "reliability": PLOTLY, "murphy-table": "text/html",
                       "by-domain": "text/html", "over-steps": "text/html",
                       "interpretation": "text/markdown"},
    "03_transfer": {"setting": "text/markdown", "transfer-heatmap": PLOTLY,
                    "transfer-table": "text/html", "baselines": "text/html",
                    "recovery": PLOTLY, "recovery-table": "text/html",
                    "interpretation": "text/markdown"},
    "04_training_ablations": {"summary-table": "text/html", "accuracy": PLOTLY,
                              "variance": PLOTLY, "value-table": "text/html",
                              "value-mae": PLOTLY, "interpretation": "text/markdown"},
}
#: The probe-study notebooks share their setup cells (parameters, capture, setting).
PROBE_STUDIES = ["01_layer_sweep", "02_calibration", "03_transfer"]


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NB_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(stem: str) -> nbformat.NotebookNode:
    return nbformat.read(str(NB_DIR / f"{stem}.ipynb"), as_version=4)


def _cell(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}; found {len(cells)}"
    return cells[0]


def _check_key_outputs(stem: str, nb) -> None:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, f"{stem}: error output {errors[0].ename}: {errors[0].evalue}"
    for tag, mime in KEY_OUTPUTS[stem].items():
        outs = [o for o in _cell(nb, tag).outputs if mime in o.get("data", {})]
        assert outs, f"{stem}: cell {tag!r} shows no {mime} output"


def _cells(nb) -> list[tuple]:
    return [(c.cell_type, c.id, c.metadata.get("tags", []), c.source) for c in nb.cells]


def test_every_notebook_has_a_source():
    """One percent-format source per notebook, and no notebook without one."""
    assert _build_module().STEMS == list(KEY_OUTPUTS)
    assert sorted(p.stem for p in NB_DIR.glob("*.ipynb")) == list(KEY_OUTPUTS)


@pytest.mark.parametrize("stem", list(KEY_OUTPUTS))
def test_committed_notebook_matches_its_source(stem):
    """The .ipynb holds the cells of its .py source: same types, ids, tags and sources."""
    built, saved = _build_module().notebook(stem), _read(stem)
    assert _cells(saved) == _cells(built), \
        (f"notebooks/{stem}.ipynb differs from notebooks/{stem}.py; run `make notebooks`, or "
         f"`jupytext --sync notebooks/{stem}.py` to update its sources and keep its outputs")


@pytest.mark.parametrize("tag", ["parameters", "capture", "setting"])
def test_shared_cells_are_the_same_in_every_notebook(tag):
    """The setup cells are copies; they stay equal (the parameters cell up to its imports)."""
    build, copies = _build_module(), {}
    for stem in PROBE_STUDIES:
        cells = [c for c in build.notebook(stem).cells if tag in c.metadata.get("tags", [])]
        if cells:
            copies[stem] = [line for line in cells[0].source.splitlines() if not (
                tag == "parameters" and line.startswith(("import ", "from ")))]
    assert len(copies) >= 2, f"cell {tag!r} is in fewer than two notebooks: {sorted(copies)}"
    first = next(iter(copies.values()))
    assert all(lines == first for lines in copies.values()), \
        f"cell {tag!r} differs between {sorted(copies)}; make the copies equal"


@pytest.mark.parametrize("stem", list(KEY_OUTPUTS))
def test_committed_notebook_has_full_outputs(stem):
    """Saved executed, in full mode, with every key table and figure and no error."""
    nb = _read(stem)
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"), \
        f"{stem} was saved unexecuted; run `make notebooks`"
    assert "mode: full" in "".join(o.get("text", "") for o in _cell(nb, "parameters").outputs)
    _check_key_outputs(stem, nb)


@pytest.fixture(scope="module")
def reduced_env(tmp_path_factory):
    """POISE_NB_* for CI mode: a capture folder to be made by the first notebook, and a run."""
    root = tmp_path_factory.mktemp("notebooks")
    return {"POISE_NB_DATA": str(root / "capture"), "POISE_NB_RUN": str(_fake_run(root / "run")),
            "POISE_NB_REDUCED": "1"}


def _fake_run(path: Path) -> Path:
    """A small run directory whose online probe gets better over 8 steps (K = 4, 8 prompts)."""
    from poise_probe.rundir import RunWriter

    rng = np.random.default_rng(0)
    meta = {"model": "tiny-reasoner", "device": "cpu", "algorithm": "poise", "git_commit": None}
    with RunWriter(path, config={"trainer": {"total_steps": 8}}, meta=meta) as writer:
        for step in range(1, 9):
            value = rng.uniform(0.1, 0.9, 8).repeat(4)                   # (P * K,)
            reward = (rng.uniform(size=value.size) < value).astype(float)
            noise = rng.normal(0, 0.4 / step, value.size)
            writer.write_rollouts(step, pd.DataFrame({
                "prompt_id": [f"p{step}-{g}" for g in range(8) for _ in range(4)],
                "group_id": np.arange(8).repeat(4), "domain": "math",
                "data_source": "poise/arith", "rollout_idx": np.tile(np.arange(4), 8),
                "prompt": "Compute 1+1.", "completion": "<think>1+1=2</think><answer>2</answer>",
                "reward": reward, "probe_pred": np.clip(value + noise, 0, 1),
                "baseline": value, "advantage": reward - value,
                "token_entropies": [np.full(5, 0.1, np.float32)] * value.size,
                "num_tokens": np.full(value.size, 5), "truncated": False}))
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stem", list(KEY_OUTPUTS))
def test_notebook_executes_in_reduced_mode(stem, reduced_env, monkeypatch):
    """Each notebook runs top to bottom on a fresh reduced capture and shows its key outputs."""
    for key, value in reduced_env.items():
        monkeypatch.setenv(key, value)
    build = _build_module()
    nb = build.execute(build.notebook(stem), timeout=240)   # in memory: no file is written
    assert "mode: reduced" in "".join(o.get("text", "")
                                      for o in _cell(nb, "parameters").outputs)
    _check_key_outputs(stem, nb)
    if stem == "02_calibration":
        steps_html = next(o for o in _cell(nb, "over-steps").outputs
                          if "text/html" in o.get("data", {}))["data"]["text/html"]
        assert "step_start" in steps_html
