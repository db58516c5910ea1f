"""Statistics of a ranking study: preference distribution, average rank and Fleiss' kappa.

CTEG §4.5 (Figure 4) shows, for each method, how often raters put its output at each rank, and
measures the raters' agreement with Fleiss' kappa. The rankings are stored as
``{rater: {item: {method: rank}}}`` with ranks ``1..K`` (1 = most emotionally consistent), each rank
used once per (rater, item).

**Ranks as categories.** Fleiss' kappa needs *subjects*, each put into one of *k categories* by the
same number ``n`` of raters. Here a subject is one (item, method) pair -- one generated output --
and its category is the rank a rater gave it (categories ``1..K``); the assessors are the raters.
So ``N = items x K`` subjects, ``k = K`` categories, ``n = raters``. Since every rater uses each rank
once per item, the marginal proportion of every category is exactly ``1/K`` and the chance agreement
is ``P_e = 1/K``; kappa is 1 when all raters rank every item identically, about 0 when their
rankings are unrelated, negative when they disagree more than chance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Rankings = Mapping[str, Mapping[str, Mapping[str, int]]]
"""``{rater: {item_id: {method: rank}}}``."""


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa of a ``(N subjects, k categories)`` table of counts: ``counts[i, j]`` raters put
    subject ``i`` into category ``j``; every row sums to the same ``n >= 2``.

    Fleiss (1971), "Measuring nominal scale agreement among many raters", Psychological Bulletin
    76(5), Eqs. 2-9: with ``p_j = sum_i n_ij / (N n)`` (the share of all assignments in category j),
    ``P_i = (sum_j n_ij^2 - n) / (n (n - 1))`` (the agreement on subject i),
    ``P̄ = mean_i P_i`` and ``P̄_e = sum_j p_j^2``,

        kappa = (P̄ - P̄_e) / (1 - P̄_e).

    NaN when ``P̄_e = 1`` (every assignment in one category: agreement beyond chance is undefined)."""
    a = np.asarray(counts, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"counts must be a non-empty (subjects, categories) table, got shape {a.shape}")
    if (a < 0).any() or not np.allclose(a, np.round(a)):
        raise ValueError("counts must be non-negative whole numbers")
    n_per = a.sum(axis=1)
    n = n_per[0]
    if not np.all(n_per == n):
        raise ValueError(f"every subject needs the same number of ratings; rows sum to {sorted(set(n_per.tolist()))}")
    if n < 2:
        raise ValueError(f"Fleiss' kappa needs at least 2 ratings per subject, got {n:g}")
    big_n = a.shape[0]
    p_j = a.sum(axis=0) / (big_n * n)
    p_i = ((a**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = p_i.mean()
    p_e = float((p_j**2).sum())
    if np.isclose(p_e, 1.0):
        return float("nan")
    return float((p_bar - p_e) / (1 - p_e))


def rank_counts(rankings: Rankings, methods: Sequence[str], items: Sequence[str]) -> np.ndarray:
    """The Fleiss table of a complete ranking study: one row per (item, method) subject (items in
    ``items`` order, methods in ``methods`` order within an item), one column per rank ``1..K``; the
    cell counts the raters that gave that output that rank."""
    k = len(methods)
    out = np.zeros((len(items) * k, k), dtype=np.int64)
    for by_item in rankings.values():
        for i, item in enumerate(items):
            for m, method in enumerate(methods):
                out[i * k + m, by_item[item][method] - 1] += 1
    return out


def preference(rankings: Rankings, methods: Sequence[str], items: Sequence[str]) -> np.ndarray:
    """Figure 4's heat map: ``(K methods, K ranks)``, row ``m`` = the fraction of (item, rater) votes
    that put method ``m`` at rank ``1..K`` (each row sums to 1)."""
    k = len(methods)
    votes = np.zeros((k, k), dtype=np.float64)
    for by_item in rankings.values():
        for item in items:
            for m, method in enumerate(methods):
                votes[m, by_item[item][method] - 1] += 1
    total = votes.sum(axis=1, keepdims=True)
    return np.divide(votes, total, out=np.zeros_like(votes), where=total > 0)


def average_rank(rankings: Rankings, methods: Sequence[str], items: Sequence[str]) -> dict[str, float]:
    """Each method's mean rank over all (item, rater) votes (lower = judged more consistent)."""
    out = {}
    for method in methods:
        ranks = [by_item[item][method] for by_item in rankings.values() for item in items]
        out[method] = float(np.mean(ranks)) if ranks else float("nan")
    return out


def summary(rankings: Rankings, methods: Sequence[str], items: Sequence[str]) -> dict:
    """Everything the report prints: ``preference`` (K x K, as lists), ``avg_rank``, ``kappa``
    (NaN with fewer than 2 raters), ``raters`` and ``items`` counts."""
    pref = preference(rankings, methods, items)
    kappa = fleiss_kappa(rank_counts(rankings, methods, items)) if len(rankings) >= 2 and items else float("nan")
    return {
        "methods": list(methods),
        "preference": pref.tolist(),
        "avg_rank": average_rank(rankings, methods, items),
        "kappa": kappa,
        "raters": len(rankings),
        "items": len(items),
    }
