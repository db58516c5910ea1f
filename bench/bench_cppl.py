"""Cppl: facelab's closed form against numerical evaluation of the 53-d normal CDF, side by side.

The reference evaluator scores each frame with scipy's multivariate-normal CDF (quasi-Monte-Carlo
integration): p = F(x+δ) − F(x−δ) under N(μ, σ²I). facelab computes the same quantity in closed
form (a product of 1-d CDFs, in log space, vectorised over all frames). Both run here on the same
frames; the figure printed is the per-frame time ratio and the relative difference of the
resulting Cppl. Usage: python bench/bench_cppl.py [--frames 300] [--seqs 1500]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import scipy
from scipy.stats import multivariate_normal

from facelab.tasks.expressions.metrics import CPPL_FLOOR, cppl_per_item, perplexity


def numerical(means: list[np.ndarray], targets: list[np.ndarray], delta: float, sigma: float) -> np.ndarray:
    """Per-sequence cross-entropy with scipy's 53-d CDF, one frame at a time (the reference's method)."""
    d = means[0].shape[1]
    out = []
    for mu, x in zip(means, targets):
        logs = []
        for m, t in zip(mu, x):
            mvn = multivariate_normal(mean=m, cov=np.eye(d) * sigma**2)
            p = mvn.cdf(t + delta) - mvn.cdf(t - delta)
            logs.append(np.log(max(p, CPPL_FLOOR)))
        out.append(-np.mean(logs))
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=1500, help="sequences for the closed form (the test split)")
    ap.add_argument("--frames", type=int, default=300, help="frames for the numerical method (it is slow)")
    ap.add_argument("--delta", type=float, default=0.8)
    ap.add_argument("--sigma", type=float, default=0.2)
    ap.add_argument("--noise", type=float, default=0.08, help="std of the prediction error")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(45), 0.5, args.seqs).astype(int), 2, 256)
    # Predictions close to the targets (a trained model's regime), so probabilities are not all floored.
    targets = [rng.normal(0, 1, (n, 53)) for n in lengths]
    means = [t + rng.normal(0, args.noise, t.shape) for t in targets]

    t0 = time.perf_counter()
    h_closed = cppl_per_item(means, targets, args.delta, args.sigma, region="cdf_difference")
    t_closed = time.perf_counter() - t0
    n_frames = int(lengths.sum())

    # The numerical method on a prefix of sequences holding about --frames frames.
    k = int(np.searchsorted(np.cumsum(lengths), args.frames)) + 1
    t0 = time.perf_counter()
    h_num = numerical(means[:k], targets[:k], args.delta, args.sigma)
    t_num = time.perf_counter() - t0
    n_num = int(lengths[:k].sum())

    per_closed, per_num = t_closed / n_frames, t_num / n_num
    cppl_closed = float(perplexity(h_closed[:k]))
    cppl_num = float(perplexity(h_num))
    print(
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, {platform.processor() or platform.machine()}"
    )
    print(
        f"closed form : {n_frames} frames ({args.seqs} sequences) in {t_closed:.3f} s = {per_closed * 1e6:.2f} µs/frame"
    )
    print(f"numerical   : {n_num} frames ({k} sequences) in {t_num:.2f} s = {per_num * 1e6:.0f} µs/frame")
    print(
        f"speed-up per frame: {per_num / per_closed:,.0f}x; the full split numerically would take ~{per_num * n_frames / 60:.1f} min"
    )
    print(
        f"Cppl on the shared {k} sequences: closed {cppl_closed:.6f}, numerical {cppl_num:.6f}, "
        f"relative difference {abs(cppl_closed - cppl_num) / cppl_num:.3e}"
    )


if __name__ == "__main__":
    main()
