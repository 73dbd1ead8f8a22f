"""The subject bootstrap (stroke_tss.metrics.bootstrap_ci): 10,000 resamples of every metric, as `report` and
`collect` draw them for each variant x phase, against the straightforward loop.

bootstrap_vs_loop: resamples/s of `bootstrap_ci` (all metrics, weighted, vectorised over chunks of resamples)
over resamples/s of a per-resample loop computing the AUC alone with scikit-learn on the repeated rows (the
reference the tests check the intervals against); 400 hemispheres of 200 subjects. The loop runs fewer
resamples (its rate does not depend on how many), and the two AUC intervals must agree within 0.01.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.metrics import roc_auc_score

from stroke_tss.metrics import bootstrap_ci

N, RESAMPLES, LOOP_RESAMPLES = 400, 10_000, 1_000


def _data(seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, N)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, N), 0, 1)
    return y, p, np.arange(N) // 2


def _loop_auc_ci(y, p, subjects, num_resamples: int) -> tuple[float, float]:
    rng = np.random.default_rng(1)
    num_subjects = subjects.max() + 1
    aucs = []
    for _ in range(num_resamples):
        w = rng.multinomial(num_subjects, np.full(num_subjects, 1 / num_subjects))[subjects]
        keep = w > 0
        yy, pp = np.repeat(y[keep], w[keep]), np.repeat(p[keep], w[keep])
        if 0 < yy.sum() < yy.size:
            aucs.append(roc_auc_score(yy, pp))
    return tuple(np.percentile(aucs, [2.5, 97.5]))


def run() -> list[dict]:
    y, p, subjects = _data()
    start = time.perf_counter()
    ci = bootstrap_ci(y, p, subjects, threshold=0.5, num_resamples=RESAMPLES)
    ours = RESAMPLES / (time.perf_counter() - start)
    start = time.perf_counter()
    loop_ci = _loop_auc_ci(y, p, subjects, LOOP_RESAMPLES)
    loop = LOOP_RESAMPLES / (time.perf_counter() - start)
    agree = max(abs(a - b) for a, b in zip(ci["auc"], loop_ci)) < 0.01
    ratio = ours / loop if agree else 0.0
    return [{"name": "bootstrap_vs_loop", "ratio": round(ratio, 2), "target": 20.0, "passed": ratio >= 20.0,
             "detail": f"ours {ours:.0f} resamples/s (9 metrics), loop {loop:.0f} resamples/s (AUC only); "
                       f"AUC CI {ci['auc'][0]:.3f}-{ci['auc'][1]:.3f} vs {loop_ci[0]:.3f}-{loop_ci[1]:.3f}"
                       + ("" if agree else " DISAGREE")}]


if __name__ == "__main__":
    print(run())
