"""`poise search`: the mechanism-search loop over this trainer's configurations.

    archive (trials, lineage, scores) -> parents by the acquisition rule -> children by mutation
    and crossover, kept when the config accepts them and they are new -> a short training run
    of each at a fixed generated-token budget (worker processes) -> held-out accuracy on the
    task mix -> the archive; at the end the best candidates are run again with other seeds to
    measure the seed variation.

The first trial is the base recipe itself (POISE on the demo recipe); the next few are random
valid configurations (the initial population); every later one is a child. The archive is
saved after every change, so a killed search reruns its unfinished trials (their runs resume
from their checkpoints) and repeats none it finished.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from poise_probe.search.acquisition import Node, Weights, acquisition
from poise_probe.search.archive import Archive, Trial
from poise_probe.search.operators import propose, random_candidate
from poise_probe.search.figures import ranked, run_name, seed_scores
from poise_probe.search.space import BASELINE, GENES, Gene, check, describe, overrides

__all__ = ["ANALYSIS", "run_search", "summarise", "trial_overrides"]

log = logging.getLogger(__name__)
ANALYSIS = "mechanism_search"
#: the step cap of a trial: the token budget ends it long before
STEP_CAP = 10_000


def trial_overrides(settings: dict, trial: Trial, space: tuple[Gene, ...] = GENES) -> list[str]:
    """Everything a trial's run is configured with: base recipe, genes, budget and evaluation."""
    return (list(settings["base"]) + overrides(trial.genes, space) + [
        f"trainer.token_budget={settings['budget']}", f"trainer.total_steps={STEP_CAP}",
        f"trainer.seed={trial.seed}", "trainer.save_every=5", "trainer.keep_checkpoints=1",
        "data.eval_every=0", f"data.eval_n={settings['eval_n']}",
        f"data.eval_samples={settings['eval_samples']}"])


def run_search(out: str | Path, *, budget: int, trials: int, workers: int = 1, seed: int = 0,
               repeats: int = 2, seeds_per_repeat: int = 2, init: int = 3, eval_n: int = 50,
               eval_samples: int = 4, base: list[str] | None = None,
               weights: Weights = Weights(), png: bool = True,
               progress: Callable[[str], None] | None = None) -> dict[str, pd.DataFrame]:
    """Search `trials` configurations at `budget` generated tokens each, then run the best
    `repeats` again with `seeds_per_repeat` other seeds; returns (and writes) the summary."""
    from poise_probe.runtime import DEMO_OVERRIDES

    say = progress or log.info
    for name, value, low in (("--budget", budget, 1), ("--trials", trials, 1),
                             ("--workers", workers, 1), ("--init", init, 1),
                             ("--repeats", repeats, 0), ("--seeds-per-repeat", seeds_per_repeat, 1),
                             ("--eval-n", eval_n, 1), ("--eval-samples", eval_samples, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}; got {value}.")
    base = list(DEMO_OVERRIDES if base is None else base)
    problem = check(BASELINE, base)
    if problem:
        raise ValueError(f"the base recipe refuses the baseline candidate: {problem}")
    settings = {"budget": int(budget), "base": base, "seed": int(seed),
                "genes": {g.name: list(g.values) for g in GENES},
                "eval_n": int(eval_n), "eval_samples": int(eval_samples), "trials": int(trials),
                "init": int(init), "repeats": int(repeats),
                "seeds_per_repeat": int(seeds_per_repeat), "weights": asdict(weights)}
    arch = Archive.open(out, settings)
    arch.save()
    again = arch.unfinished()
    if again:
        say(f"resuming: {len(arch.done())} trials done, {len(again)} to finish")
    pool = _Inline() if workers == 1 else ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_die_with_parent)
    flying: dict[Future, Trial] = {}
    try:
        while True:
            while len(flying) < workers:
                trial = _next_trial(arch, flying.values(), settings, weights)
                if trial is None:
                    break
                trial.state = "running"
                arch.save()
                say(f"{trial.run_name} ({trial.op}{_parents(trial)}): {describe(trial.genes)}")
                flying[pool.submit(train_trial, _trial_config(settings, trial),
                                   str(arch.run_dir(trial)))] = trial
            if not flying:
                break
            done, _ = wait(list(flying), return_when=FIRST_COMPLETED)
            for fut in done:
                _finish(arch, flying.pop(fut), _result(fut), say)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    tables = summarise(arch)
    _write_study(arch, tables, png)
    best = tables["best"]
    if len(best):
        top = best.iloc[0]
        say(f"best: {top['run']} {top['label']}: {top['score']:.3f}"
            + (f" (over {int(top['n_seeds'])} seeds: {top['mean']:.3f} ± {top['sd']:.3f})"
               if top["n_seeds"] > 1 else ""))
    return tables


class _Inline:
    """`--workers 1`: each trial runs in this process when submitted; a done Future comes back,
    so the loop has one path for both."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:  # the trial failed, the search goes on
            fut.set_exception(exc)
        return fut

    def shutdown(self, **_kwargs) -> None:
        pass


def _parents(trial: Trial) -> str:
    return f" of {', '.join(run_name(p) for p in trial.parents)}" if trial.parents else ""


def _trial_config(settings: dict, trial: Trial) -> dict:
    from poise_probe.config import load_config

    return load_config(None, trial_overrides(settings, trial)).to_dict()


def _nodes(arch: Archive) -> list[Node]:
    return [Node(t.id, tuple(t.parents), t.genes, float(t.score)) for t in arch.evaluated()
            if t.score is not None and math.isfinite(t.score)]


def _next_trial(arch: Archive, flying, settings: dict, weights: Weights) -> Trial | None:
    """The next trial to train: an unfinished one, else a new proposal while the budget of
    trials lasts, else (once every search trial is done) the repeats of the best."""
    busy = {t.id for t in flying}
    for t in arch.unfinished():
        if t.id not in busy:
            return t
    searched = [t for t in arch.trials if t.repeat_of is None]
    seed = settings["seed"]
    if len(searched) < settings["trials"]:
        rng = np.random.default_rng([seed, len(arch.trials)])
        if not searched:
            return arch.add(BASELINE, parents=[], op="seed", seed=seed)
        if len(searched) < settings["init"]:
            for _ in range(500):
                genes = random_candidate(GENES, rng)
                if not arch.seen(genes) and check(genes, settings["base"]) is None:
                    return arch.add(genes, parents=[], op="seed", seed=seed)
        nodes = _nodes(arch)
        if not nodes and busy:
            return None                     # wait for a first score before proposing children
        genes, parents, op = propose(nodes, arch.seen, settings["base"], rng, weights=weights)
        return arch.add(genes, parents=parents, op=op, seed=seed)
    if busy or any(t.state != "done" and t.state != "failed" for t in searched):
        return None
    if any(t.repeat_of is not None for t in arch.trials):
        return None                         # repeats were planned already
    ranked = sorted((t for t in arch.evaluated() if t.score is not None),
                    key=lambda t: (-t.score, t.id))[:settings["repeats"]]
    for t in ranked:
        for k in range(1, settings["seeds_per_repeat"] + 1):
            arch.add(t.genes, parents=[t.id], op="repeat", seed=seed + k, repeat_of=t.id)
    arch.save()
    return _next_trial(arch, flying, settings, weights) if ranked else None


def _die_with_parent() -> None:
    """Workers die with the search (Linux): a killed search leaves no orphan still writing a
    trial's run, which would hold the run's lock when the rerun resumes it."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)           # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def train_trial(cfg: dict, run_dir: str) -> dict:
    """One trial's run in a worker (one torch thread): train at the budget, or resume a killed
    one; returns its score (final held-out accuracy), tokens, steps and seconds."""
    import torch

    from poise_probe.config import from_dict
    from poise_probe.rundir import RunReader
    from poise_probe.runtime import quiet_library_bars
    from poise_probe.trainer import train

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path = Path(run_dir)
    finished = (path / "status.json").is_file() and \
        RunReader(path).status.get("status") == "finished"
    if not finished:
        with quiet_library_bars():
            train(from_dict(cfg), path, resume=(path / "meta.json").is_file())
    m = RunReader(path).metrics()
    evals = [r["eval/accuracy"] for r in m if r.get("eval/accuracy") is not None]
    return {"score": float(evals[-1]) if evals else None,
            "tokens": int(sum(r.get("tokens/sampled", 0) or 0 for r in m)),
            "steps": max((r["step"] for r in m), default=0),
            "seconds": time.perf_counter() - t0}


def _result(fut: Future) -> dict:
    try:
        return fut.result()
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _finish(arch: Archive, trial: Trial, result: dict, say) -> None:
    if "error" in result:
        trial.state, trial.error = "failed", result["error"]
        say(f"{trial.run_name}: failed: {result['error']}")
    else:
        trial.state = "done"
        trial.score, trial.tokens = result["score"], result["tokens"]
        trial.steps, trial.seconds = result["steps"], result["seconds"]
        say(f"{trial.run_name}: accuracy {trial.score:.3f} after {trial.steps} steps, "
            f"{trial.tokens} tokens, {trial.seconds:.0f} s")
    arch.save()


def summarise(arch: Archive) -> dict[str, pd.DataFrame]:
    """`trials`: every trial with its genes, lineage, score and acquisition terms; `best`: the
    scored candidates, best first, with the mean and sd over their seeds (repeats included);
    `seed_variation`: the pooled within-candidate sd over the repeated candidates."""
    terms = acquisition(_nodes(arch), Weights(**arch.settings.get("weights", {})))
    rows = []
    for t in arch.trials:
        row = {"id": t.id, "run": t.run_name, "op": t.op,
               "parents": ",".join(run_name(p) for p in t.parents),
               "repeat_of": t.repeat_of, "seed": t.seed, "label": describe(t.genes),
               **{f"gene.{k}": v for k, v in t.genes.items()}, "state": t.state,
               "score": t.score, "tokens": t.tokens, "steps": t.steps, "seconds": t.seconds,
               "error": t.error}
        row.update({f"acq.{k}": v for k, v in terms.get(t.id, {}).items()})
        rows.append(row)
    trials = pd.DataFrame(rows)
    plain = [asdict(t) for t in arch.trials]
    scores, by_id = seed_scores(plain), {t.id: t for t in arch.trials}
    best, groups = [], []
    for row in ranked(plain):
        t, values = by_id[row["id"]], scores[row["id"]]
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        best.append({"run": t.run_name, "label": describe(t.genes), "score": t.score,
                     "n_seeds": len(values), "mean": float(np.mean(values)), "sd": sd,
                     "overrides": " ".join(overrides(t.genes))})
        if len(values) > 1:
            groups.append(values)
    pooled = (math.sqrt(sum((len(g) - 1) * np.var(g, ddof=1) for g in groups)
                        / sum(len(g) - 1 for g in groups)) if groups else math.nan)
    seed_variation = pd.DataFrame([{"candidates": len(groups),
                                    "runs": sum(len(g) for g in groups),
                                    "pooled_sd": pooled}])
    return {"trials": trials, "best": pd.DataFrame(best), "seed_variation": seed_variation}


def _write_study(arch: Archive, tables: dict[str, pd.DataFrame], png: bool) -> None:
    from poise_probe.study.report import StudyWriter

    writer = StudyWriter(arch.root, dataset=f"mechanism search at {arch.settings['budget']} "
                                            f"tokens", png=png)
    for name, frame in tables.items():
        writer.table(ANALYSIS, name, frame)
    from poise_probe.search.figures import family_tree_figure

    writer.figure(ANALYSIS, "family_tree", family_tree_figure(
        [asdict(t) for t in arch.trials], title=f"mechanism search: {len(arch.trials)} trials at "
                                                f"{arch.settings['budget']} tokens each"))
    writer.record(ANALYSIS, {k: v for k, v in arch.settings.items() if k != "genes"})
