"""The study's closed-form ridge path against scikit-learn refitting per alpha, in the same run.

    nice .venv/bin/python benchmarks/bench_ridge.py [--rows 2000] [--features 1024,4096]
                                                   [--alphas 20] [--repeat 2] [--threads 1]

Issue 12 keeps `poise_probe.study.ridge.RidgePath` (one eigendecomposition -> predictions for
every alpha) only if it is at least 5x faster than scikit-learn with equal results. On prompt-
grouped synthetic data shaped like a probe study (rows = prompts x 4 rollouts, uneven feature
scales and offsets like pooled hidden states, targets in [0, 1]) it times, per feature count,
1. *path*: one training part (the size of an inner training fold), predictions for every
   alpha: `RidgePath(X, y).predict(X_test, alphas)` against
   `make_pipeline(StandardScaler(), Ridge(alpha)).fit(X, y).predict(X_test)` per alpha;
2. *nested*: 5 outer x 3 inner grouped folds, the alpha picked per outer fold:
   `cross_val_predict` against `GridSearchCV(pipeline, cv=<the same inner folds>)` with the
   same clipped-MSE score and selection rule (pooled over rows, ties -> larger alpha), refit
   on the outer training part.
Each runs with `--threads` BLAS threads (both sides alike; default one, since on a shared
2-core machine two threads oversubscribe it and the timings turn to noise), the two alternated
`--repeat` times; prints median seconds, the speed-up (scikit-learn / closed form) and the largest absolute
difference of predictions (nested: also of the inner MSE per alpha; the outer refit is the
same scikit-learn pipeline on both sides). Writes benchmarks/results/ridge.json; BENCHMARKS.md shows it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import sklearn
from sklearn.linear_model import Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from poise_probe.study.ridge import RidgePath, cross_val_predict, grouped_folds

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "ridge.json"
ROLLOUTS = 4  # rows per prompt
OUTER, INNER = 5, 3


def make_data(rows: int, features: int, seed: int = 0):
    """Prompt-grouped rows: features = prompt state + rollout noise; target a noisy prompt value."""
    rng = np.random.default_rng(seed)
    prompts = rows // ROLLOUTS
    groups = np.repeat(np.arange(prompts), ROLLOUTS)  # (n,)
    state = rng.standard_normal((prompts, features))
    X = state[groups] + 0.5 * rng.standard_normal((groups.size, features))
    X = X * rng.uniform(0.1, 10, features) + rng.uniform(-50, 50, features)  # (n, p)
    w = rng.standard_normal(features) / np.sqrt(features)
    value = 1 / (1 + np.exp(-2 * state @ w))  # (prompts,)
    y = np.clip(value[groups] + 0.2 * rng.standard_normal(groups.size), 0, 1)
    return X, y, groups


def clipped_mse(y_true, y_pred):
    return float(np.mean((np.clip(y_pred, 0.0, 1.0) - y_true) ** 2))


def pooled_mse(cv_results, sizes: np.ndarray) -> np.ndarray:
    """Inner MSE pooled over rows from GridSearchCV's per-fold scores. -> (A,)."""
    mse = -np.stack([cv_results[f"split{i}_test_score"] for i in range(sizes.size)])  # (F, A)
    return sizes @ mse / sizes.sum()


def pooled_rule(sizes: np.ndarray, alphas: np.ndarray):
    """GridSearchCV `refit` callable: lowest row-pooled inner MSE, ties -> the larger alpha."""
    def best_index(cv_results) -> int:
        pooled = pooled_mse(cv_results, sizes)
        ties = np.flatnonzero(pooled <= pooled.min() * (1 + 1e-12))
        return int(ties[np.argmax(alphas[ties])])
    return best_index


def sklearn_nested(X, y, groups, alphas, seed: int = 0):
    """`cross_val_predict`'s nested grouped CV with GridSearchCV over the pipeline per alpha."""
    raw, chosen, inner_mse = np.empty(y.size), [], []
    for k, (tr, te) in enumerate(grouped_folds(groups, OUTER, seed)):
        inner = grouped_folds(groups[tr], INNER, np.random.default_rng([seed, k]))
        sizes = np.array([t.size for _, t in inner], dtype=float)
        search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()),
                              {"ridge__alpha": alphas}, cv=inner, error_score="raise",
                              scoring=make_scorer(clipped_mse, greater_is_better=False),
                              refit=pooled_rule(sizes, alphas)).fit(X[tr], y[tr])
        raw[te] = search.predict(X[te])
        chosen.append(search.best_params_["ridge__alpha"])
        inner_mse.append(pooled_mse(search.cv_results_, sizes))
    return raw, np.array(chosen), np.array(inner_mse)


def race(closed_form, scikit_learn, repeat: int):
    """Seconds of each, alternated run by run (the machine is shared), and their last outputs."""
    runs: dict[str, list[float]] = {"closed_form": [], "sklearn": []}
    out = {}
    for _ in range(repeat):
        for name, fn in (("closed_form", closed_form), ("sklearn", scikit_learn)):
            t0 = time.perf_counter()
            out[name] = fn()
            runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"closed_form_s": med["closed_form"], "sklearn_s": med["sklearn"],
            "speedup": med["sklearn"] / med["closed_form"], "runs_s": runs}, out


def bench(rows: int, features: int, alphas: np.ndarray, repeat: int) -> dict:
    X, y, groups = make_data(rows, features)
    # path: one inner training part (4/5 * 2/3 of the prompts) against the other prompts
    train = groups < groups.max() * 8 // 15
    Xtr, ytr, Xte = X[train], y[train], X[~train]
    path, out = race(
        lambda: RidgePath(Xtr, ytr).predict(Xte, alphas),
        lambda: np.stack([make_pipeline(StandardScaler(), Ridge(alpha=a)).fit(Xtr, ytr)
                          .predict(Xte) for a in alphas]), repeat)
    path.update(train_rows=int(train.sum()), test_rows=int((~train).sum()),
                max_abs_diff=float(np.abs(out["closed_form"] - out["sklearn"]).max()))
    print(f"  path   p={features}: closed form {path['closed_form_s']:.2f} s, sklearn "
          f"{path['sklearn_s']:.2f} s, {path['speedup']:.1f}x, max |diff| "
          f"{path['max_abs_diff']:.1e}", flush=True)
    nested, out = race(
        lambda: cross_val_predict(X, y, groups, alphas, n_splits=OUTER, inner_splits=INNER),
        lambda: sklearn_nested(X, y, groups, alphas), repeat)
    cv, (raw, chosen, inner_mse) = out["closed_form"], out["sklearn"]
    nested.update(max_abs_diff=float(np.abs(cv.raw_pred - raw).max()),
                  inner_mse_max_abs_diff=float(np.abs(cv.inner_mse - inner_mse).max()),
                  alpha_closed_form=cv.alpha.tolist(), alpha_sklearn=chosen.tolist(),
                  same_alphas=bool(np.array_equal(cv.alpha, chosen)))
    print(f"  nested p={features}: closed form {nested['closed_form_s']:.1f} s, sklearn "
          f"{nested['sklearn_s']:.1f} s, {nested['speedup']:.1f}x, max |diff| "
          f"{nested['max_abs_diff']:.1e} (inner MSE {nested['inner_mse_max_abs_diff']:.1e}), "
          f"same alphas: {nested['same_alphas']}", flush=True)
    return {"path": path, "nested": nested}


def machine() -> dict:
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']} {i['version']} ({i['num_threads']} threads by default)"
            for i in threadpool_info() if i["user_api"] == "blas"]
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": None, "numpy": np.__version__, "sklearn": sklearn.__version__, "blas": blas,
            "platform": platform.platform()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--features", default="1024,4096")
    ap.add_argument("--alphas", type=int, default=20, help="grid size, logspace(-1, 4)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", default="1",
                    help="BLAS threads, comma-separated, one run each (both sides alike)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    alphas = np.logspace(-1, 4, args.alphas)
    result = {"date": dt.date.today().isoformat(), "machine": machine(),
              "sizes": {"rows": args.rows, "rollouts_per_prompt": ROLLOUTS, "alphas": args.alphas,
                        "outer_folds": OUTER, "inner_folds": INNER, "repeat": args.repeat},
              "threads": {}}
    for threads in (int(v) for v in args.threads.split(",")):
        by_p = result["threads"][str(threads)] = {}
        with threadpool_limits(threads):
            for p in (int(v) for v in args.features.split(",")):
                print(f"rows={args.rows} features={p} alphas={args.alphas} threads={threads}:",
                      flush=True)
                by_p[str(p)] = bench(args.rows, p, alphas, args.repeat)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each size
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
