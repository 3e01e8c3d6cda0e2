"""The segment GAE Hista and Numca share (RELATED.md A.2.1): gamma = 1, the reward only at the
end of a chain of state values."""
from __future__ import annotations

import numpy as np

__all__ = ["segment_gae"]


def segment_gae(values, lam: float) -> np.ndarray:
    """Backward GAE over segments: values [V_0..V_{n-1}, r] (n + 1,) -> A (n,) float64, with
    d_j = values[j+1] - values[j], A_{n-1} = d_{n-1}, A_j = d_j + lam A_{j+1}.

    lam = 1 gives A_j = r - V_j; lam = 0 gives A_j = d_j. Test vector T4: values
    [0.5, 6/7, 0.25, 1] -> [0.5, 1/7, 0.75] (lam 1) and [0.241071, -0.232143, 0.75] (lam 0.5).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    delta = np.diff(v)
    out = np.empty_like(delta)
    acc = 0.0
    for j in range(delta.shape[0] - 1, -1, -1):
        acc = float(delta[j]) + lam * acc
        out[j] = acc
    return out
