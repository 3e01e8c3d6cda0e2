"""Write the probe-study notebooks from their jupytext sources; `--execute` runs them in place.

    python notebooks/build.py              # notebooks/NN_*.py -> NN_*.ipynb (no outputs)
    python notebooks/build.py --execute    # ... then execute each and save its outputs
    make notebooks                         # capture (or resume) the data, then the line above

Each notebook's source is notebooks/NN_<name>.py in jupytext's percent format (`# %%` cells),
paired with its .ipynb by notebooks/jupytext.toml. The notebooks read their parameters from the
environment in their first cell, which the options below set: POISE_NB_DATA (capture directory,
made there when missing; default notebooks/data/tiny_capture), POISE_NB_RUN (optional trainer
run directory: calibration over training steps) and POISE_NB_REDUCED=1 (the small CI version
that tests/test_notebooks.py executes). Cell ids are fixed (`01-00`, ...), so regenerating an
unchanged notebook changes nothing but its outputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat

NB_DIR = Path(__file__).resolve().parent
#: File stems of the notebooks, in order: one per source notebooks/NN_<name>.py.
STEMS = sorted(p.stem for p in NB_DIR.glob("[0-9][0-9]_*.py"))


def notebook(stem: str) -> nbformat.NotebookNode:
    """The notebook of notebooks/<stem>.py: its cells, fixed cell ids and no outputs."""
    nb = jupytext.read(NB_DIR / f"{stem}.py", fmt="py:percent")
    nb.metadata.pop("jupytext", None)     # the pairing lives in jupytext.toml
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):
        cell.id = f"{stem.split('_', 1)[0]}-{i:02d}"
    nbformat.validate(nb)
    return nb


def execute(nb: nbformat.NotebookNode, *, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run every cell in a python3 kernel started in notebooks/ (the environment passes on)."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(NB_DIR)}})
    client.execute()
    return nb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", action="store_true", help="execute and save outputs")
    p.add_argument("--only", nargs="+", choices=STEMS, help="these notebooks only")
    p.add_argument("--data", help="sets POISE_NB_DATA for the kernels")
    p.add_argument("--run", help="sets POISE_NB_RUN for the kernels")
    p.add_argument("--reduced", action="store_true", help="sets POISE_NB_REDUCED=1 (CI mode)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = p.parse_args(argv)
    if args.data:
        os.environ["POISE_NB_DATA"] = str(Path(args.data).resolve())
    if args.run:
        if not Path(args.run).is_dir():
            p.error(f"--run {args.run}: no such run directory")
        os.environ["POISE_NB_RUN"] = str(Path(args.run).resolve())
    if args.reduced:
        os.environ["POISE_NB_REDUCED"] = "1"
    for stem in args.only or STEMS:
        nb, path = notebook(stem), NB_DIR / f"{stem}.ipynb"
        if args.execute:
            t0 = time.time()
            print(f"executing {path.name} ...", file=sys.stderr, flush=True)
            execute(nb, timeout=args.timeout)
            print(f"  done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        nbformat.write(nb, str(path))
        print(f"wrote {path.relative_to(NB_DIR.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
