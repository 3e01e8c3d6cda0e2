"""The TRL recipe with every step's gathered POISE inputs and outputs saved per process.

Run by tests/test_trl_integration.py, alone or under `accelerate launch`: writes
`<output>/record_rank<R>.pkl`, a list of `PoiseGRPOTrainer.last_step` dicts, one per step.
"""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

from poise_probe.integrations.trl import PoiseGRPOTrainer
from poise_probe.integrations.trl_recipe import build_trainer, parse_args


class RecordingTrainer(PoiseGRPOTrainer):
    records: list = []

    def _poise_advantages(self, *args, **kwargs):
        super()._poise_advantages(*args, **kwargs)
        self.records.append(self.last_step)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    trainer = build_trainer(args, RecordingTrainer)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    rank = int(os.environ.get("RANK", "0"))
    with open(Path(args.output) / f"record_rank{rank}.pkl", "wb") as f:
        pickle.dump(trainer.records, f)
