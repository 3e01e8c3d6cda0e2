"""This project's tasks as verl Parquet files (train.parquet, test.parquet).

    python -m poise_probe.integrations.verl.data --tasks arith,boolean --out data/verl --train 2000

Rows are verl's format (`data_source`, chat `prompt`, `ability` = domain, `reward_model.
ground_truth`, `extra_info`), written by `poise_probe.tasks.files.write_rows`, the one writer
of that format; `data_source` is what the POISE driver routes the probe bank by.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from poise_probe.tasks import get_task
from poise_probe.tasks.files import write_rows

logger = logging.getLogger(__name__)

__all__ = ["write_verl_parquet", "main"]


def write_verl_parquet(tasks: list[str], out, *, train: int = 1000, test: int = 100,
                       seed: int = 0) -> dict[str, Path]:
    """Sample `train`/`test` examples per task and write out/{train,test}.parquet."""
    if not tasks:
        raise ValueError("tasks must name at least one task, e.g. ['arith', 'boolean'].")
    if train < 1 or test < 0:
        raise ValueError(f"train must be >= 1 and test >= 0 examples per task; got {train}, {test}.")
    out = Path(out)
    paths = {}
    for split, n in (("train", train), ("test", test)):
        if n == 0:
            continue
        rows = [ex for name in tasks for ex in get_task(name).sample(n, seed=seed, split=split)]
        paths[split] = write_rows(out / f"{split}.parquet", rows)
        logger.info("wrote %d %s rows to %s", len(rows), split, paths[split])
    return paths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", required=True, help="comma-separated task names (poise tasks)")
    ap.add_argument("--out", required=True, help="output folder for train/test.parquet")
    ap.add_argument("--train", type=int, default=1000, help="train examples per task")
    ap.add_argument("--test", type=int, default=100, help="test examples per task")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    paths = write_verl_parquet([t for t in args.tasks.split(",") if t], args.out,
                               train=args.train, test=args.test, seed=args.seed)
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
