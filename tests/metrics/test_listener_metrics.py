"""LM-Listener's evaluation (CTEG Table 5): L2, FD, Variation, P-FD against independent implementations
and known values; the listener protocol end to end on a built dataset (baselines, a tiny CTEG, the
scoring entry points), the report's Table 5 layout, and the shipped sweep."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facelab.core.tracking import TrialRun
from facelab.data.emoava import DataError, load_split
from facelab.data.lm_listener_data import load_speaker
from facelab.data.synth_lm_listener import build_lm_listener
from facelab.families.cteg.job import METRICS as CTEG_METRICS
from facelab.families.cteg.job import CTEGJob
from facelab.families.cteg.model import CTEG, CTEGConfig
from facelab.families.lm_listener.job import METRICS as LM_LISTENER_METRICS
from facelab.report import render, table_metrics
from facelab.spec.loading import load_sweep
from facelab.tasks.expressions.evaluate import EvalConfig
from facelab.tasks.expressions.listener import (
    DIRECTIONS,
    METRICS,
    evaluate_listener_baseline,
    evaluate_listener_model,
    listener_metrics_from_samples,
)
from facelab.tasks.expressions.metrics import (
    activation_statistics,
    frechet_distance,
    listener_fd,
    listener_fd_per_item,
    listener_l2,
    listener_l2_per_item,
    listener_pfd,
    listener_pfd_per_item,
    variation_per_item,
)
from facelab.tasks.expressions.scoring import check_eval_data, run_baseline_eval, run_test_eval

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------
# Independent reference implementations (written for the test, not taken from the module)
# --------------------------------------------------------------------------------------------


def ref_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to the rows of ``a`` and ``b``, with the symmetric form
    tr((S1^1/2 S2 S1^1/2)^1/2) of the cross term, computed by eigendecompositions."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m1, m2 = a.mean(0), b.mean(0)
    s1 = (a - m1).T @ (a - m1) / (len(a) - 1)
    s2 = (b - m2).T @ (b - m2) / (len(b) - 1)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def ref_fd_sqrtm(a: np.ndarray, b: np.ndarray) -> float:
    """The same with scipy.linalg.sqrtm of S1 S2, as evaluate_listener.py writes it (no fallbacks)."""
    from scipy.linalg import sqrtm

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm(s1 @ s2).real))


def random_pairs(seed: int, n: int = 6, dim: int = 8):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(30, 80, size=n)
    gt = [rng.normal(size=(t, dim)) for t in lengths]
    pred = [rng.normal(0.3, 1.4, size=(t + int(rng.integers(-10, 10)), dim)) for t in lengths]
    speaker = [rng.normal(size=(t, dim + 3)) for t in lengths]
    return gt, pred, speaker


# --------------------------------------------------------------------------------------------
# The four metrics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_independent_implementations(seed):
    gt, pred, speaker = random_pairs(seed)
    common = [min(len(g), len(p)) for g, p in zip(gt, pred)]
    l2 = [np.mean((g[:n] - p[:n]) ** 2) for g, p, n in zip(gt, pred, common)]
    fd = [ref_fd(g[:n], p[:n]) for g, p, n in zip(gt, pred, common)]
    pfd = [
        ref_fd(np.hstack([s[:n], g[:n]]), np.hstack([s[:n], p[:n]])) for g, p, s, n in zip(gt, pred, speaker, common)
    ]
    var = [np.mean(np.var(p, axis=0)) for p in pred]
    np.testing.assert_allclose(listener_l2_per_item(gt, pred), l2, rtol=1e-12)
    np.testing.assert_allclose(listener_fd_per_item(gt, pred), fd, rtol=1e-7)
    np.testing.assert_allclose(listener_pfd_per_item(gt, pred, speaker), pfd, rtol=1e-7)
    np.testing.assert_allclose(variation_per_item(pred), var, rtol=1e-12)
    assert listener_l2(gt, pred) == pytest.approx(np.mean(l2), rel=1e-12)
    assert listener_fd(gt, pred) == pytest.approx(np.mean(fd), rel=1e-7)
    assert listener_pfd(gt, pred, speaker) == pytest.approx(np.mean(pfd), rel=1e-7)
    n = common[0]
    assert frechet_distance(*activation_statistics(gt[0][:n]), *activation_statistics(pred[0][:n])) == pytest.approx(
        ref_fd_sqrtm(gt[0][:n], pred[0][:n]), rel=1e-9
    )


def test_known_values():
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(120, 53)), rng.normal(size=(90, 53))]
    shifted = [s + 1.0 for s in x]
    speaker = [rng.normal(size=(len(s), 56)) for s in x]
    assert listener_l2(x, shifted) == pytest.approx(1.0, abs=1e-12)  # (x - (x + 1))^2 = 1 everywhere
    assert listener_l2(x, x) == 0.0
    np.testing.assert_allclose(listener_fd_per_item(x, x), 0.0, atol=1e-6)  # identical sets
    np.testing.assert_allclose(listener_pfd_per_item(x, x, speaker), 0.0, atol=1e-6)
    np.testing.assert_allclose(listener_fd_per_item(x, shifted), 53.0, rtol=1e-6)  # mean shift 1 in 53 dims
    np.testing.assert_allclose(listener_pfd_per_item(x, shifted, speaker), 53.0, rtol=1e-6)
    # one dimension: FD = (m1 - m2)^2 + (s1 - s2)^2 with the sample statistics
    a, b = rng.normal(2.0, 3.0, size=(500, 1)), rng.normal(-1.0, 0.5, size=(400, 1))
    s1, s2 = a.std(ddof=1), b.std(ddof=1)
    expected = (a.mean() - b.mean()) ** 2 + (s1 - s2) ** 2
    assert frechet_distance(*activation_statistics(a), *activation_statistics(b)) == pytest.approx(expected, rel=1e-9)


def test_alignment_and_undefined_items():
    rng = np.random.default_rng(1)
    gt = [rng.normal(size=(50, 4)), rng.normal(size=(40, 4)), rng.normal(size=(30, 4))]
    longer = [np.vstack([g, rng.normal(size=(7, 4))]) for g in gt]
    np.testing.assert_array_equal(listener_l2_per_item(gt, longer), 0.0)  # compared over the common frames only
    shorter = [g[:1] for g in gt]
    assert np.isnan(listener_fd_per_item(gt, shorter)).all()  # one aligned frame: no covariance
    with pytest.raises(ValueError, match="no item has a finite value"):
        listener_fd(gt, shorter)
    mixed = [gt[0], gt[1][:1], gt[2]]
    assert listener_fd(gt, mixed) == pytest.approx(0.0, abs=1e-8)  # the undefined item is left out
    with pytest.raises(ValueError, match="2 ground-truth sequences but 3"):
        listener_l2_per_item(gt[:2], gt)
    with pytest.raises(ValueError, match="speaker frames"):
        listener_pfd_per_item(gt, gt, [s[:5] for s in gt])
    # fewer frames than dimensions: singular covariances go through the release's eps fallback, no exception
    few = [rng.normal(size=(6, 53))]
    value = listener_fd_per_item(few, [rng.normal(size=(6, 53))])[0]
    assert math.isnan(value) or math.isfinite(value)


def test_metric_registry_and_directions():
    assert METRICS == ["l2", "fd", "variation", "pfd"]  # Table 5's column order
    assert DIRECTIONS == {"l2": "↓", "fd": "↓", "variation": "→", "pfd": "↓"}
    for reported in (CTEG_METRICS, LM_LISTENER_METRICS):
        assert {f"test/{m}" for m in METRICS} <= reported


# --------------------------------------------------------------------------------------------
# The protocol on a built dataset
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_listener") / "lm_listener"
    build_lm_listener(root, n_train=4, n_val=3, seed=0)
    return root


QUICK = dict(n_bootstrap=50, batch_size=8)


def test_baseline_rows(data_dir):
    test, train = load_split(data_dir, "test"), load_split(data_dir, "train")
    speaker = load_speaker(data_dir, "test")
    cfg = EvalConfig(**QUICK)
    gt = evaluate_listener_baseline("gt", test, speaker, train, cfg)
    assert list(gt) == METRICS
    assert gt["l2"][0] == 0.0 and abs(gt["fd"][0]) < 1e-6 and abs(gt["pfd"][0]) < 1e-6
    assert gt["variation"][0] == pytest.approx(float(np.mean(variation_per_item(test.sequences))))
    rnd = evaluate_listener_baseline("random", test, speaker, train, cfg)
    shuf = evaluate_listener_baseline("shuffle", test, speaker, train, cfg)
    assert rnd["l2"][0] > 0 and rnd["fd"][0] > 0 and rnd["pfd"][0] > 0
    assert shuf["fd"][0] == pytest.approx(0.0, abs=1e-6)  # a permutation keeps every window's frame Gaussian
    assert shuf["l2"][0] > 0 and shuf["variation"][0] == pytest.approx(gt["variation"][0])
    for row in (gt, rnd, shuf):
        assert all(math.isfinite(se) and se >= 0 for _v, se in row.values())
    assert evaluate_listener_baseline("random", test, speaker, train, cfg) == rnd  # seeded


def test_tiny_cteg_row_and_scoring_entry_points(data_dir):
    torch.manual_seed(0)
    tiny = dict(d_model=32, n_heads=4, ff_dim=64, latent_dim=16, ewa_dim=8, ewa_heads=2, max_frames=32)
    model = CTEG(CTEGConfig(**tiny), torch.zeros(53))
    test, speaker = load_split(data_dir, "test"), load_speaker(data_dir, "test")
    cfg = EvalConfig(max_frames=32, **QUICK)
    res = evaluate_listener_model(model, test, speaker, cfg)
    assert list(res) == METRICS and all(math.isfinite(v) for v, _ in res.values())
    assert res["l2"][0] > 0 and res["fd"][0] > 0
    assert evaluate_listener_model(model, test, speaker, cfg) == res  # deterministic for a seed

    job = CTEGJob.model_validate(
        {
            "data": {"path": str(data_dir)},
            "eval": {"protocol": "listener", "max_frames": 32, "n_bootstrap": 50, "batch_size": 8},
        }
    ).model_dump(mode="json")
    check_eval_data(job, data_dir)
    metrics = run_test_eval(model, job, data_dir, "cpu", None, None)
    assert {f"test/{m}" for m in METRICS} <= set(metrics) and "test/cppl" not in metrics
    assert metrics["test/l2"] == pytest.approx(res["l2"][0])
    job["eval"]["baseline"] = "gt"
    gt = run_baseline_eval(job, data_dir)
    assert gt["test/l2"] == 0.0 and "test/variation_se" in gt
    (data_dir.parent / "bare").mkdir()
    with pytest.raises(DataError, match="speaker.npz: missing"):
        check_eval_data(job, data_dir.parent / "bare")


def test_listener_protocol_refuses_table2_rows():
    with pytest.raises(ValueError, match="rows of the emoava protocol"):
        CTEGJob.model_validate({"eval": {"protocol": "listener", "shuffle_row": True}})
    assert CTEGJob().eval.protocol == "emoava"


def test_samples_and_truth_counts_must_agree():
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(20, 53)) for _ in range(3)]
    spk = [rng.normal(size=(20, 56)) for _ in range(3)]
    res = listener_metrics_from_samples(seqs, seqs, spk, EvalConfig(**QUICK))
    assert res["l2"] == (0.0, 0.0)
    with pytest.raises(ValueError):
        listener_metrics_from_samples(seqs[:2], seqs, spk, EvalConfig(**QUICK))


# --------------------------------------------------------------------------------------------
# Report and sweep
# --------------------------------------------------------------------------------------------


def _trial(run_id: str, variant: str, values: dict[str, float]) -> TrialRun:
    metrics = {f"test/{k}": v for k, v in values.items()} | {f"test/{k}_se": 0.01 for k in values}
    return TrialRun(run_id, variant, 0, "FINISHED", metrics, {}, {}, "")


def test_report_prints_table5_with_its_arrows():
    from facelab.report import aggregate

    trials = [
        _trial("a", "CTEG", {"l2": 0.5, "fd": 2.0, "variation": 0.30, "pfd": 3.0}),
        _trial("b", "LM-Listener", {"l2": 0.7, "fd": 1.5, "variation": 0.10, "pfd": 4.0}),
        _trial("c", "GT", {"l2": 0.0, "fd": 0.0, "variation": 0.25, "pfd": 0.0}),
    ]

    class Parent:
        class data:
            params: dict = {}

    metrics = table_metrics(Parent, trials)
    assert metrics == ["test/l2", "test/fd", "test/variation", "test/pfd"]
    table = render(aggregate(trials, metrics), metrics)
    head = table.splitlines()[0]
    assert head == "| Variant | L2 ↓ | FD ↓ | Variation → | P-FD ↓ |"
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "**0.500 ± 0.010**" in rows["CTEG"] and "**3.000 ± 0.010**" in rows["CTEG"]  # L2, P-FD
    assert "**0.300 ± 0.010**" in rows["CTEG"]  # Variation closest to GT's 0.25
    assert "**1.500 ± 0.010**" in rows["LM-Listener"]  # FD
    assert "**" not in rows["GT"]


def test_shipped_sweep_dry_run():
    loaded = load_sweep(REPO / "sweeps" / "cteg_listener.yaml", root=REPO)
    assert [t.variant for t in loaded.trials] == ["CTEG", "LM-Listener", "GT"]
    assert loaded.job_dict["eval"]["protocol"] == "listener" and loaded.job_dict["data"]["path"] == "data/lm_listener"
    lm = loaded.variant_jobs["LM-Listener"]
    assert lm["kind"] == "lm_listener" and lm["eval"]["protocol"] == "listener"
    assert lm["data"]["path"] == "data/lm_listener"
    proc = subprocess.run(
        [sys.executable, "-m", "facelab", "sweep", "sweeps/cteg_listener.yaml", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "3 trial(s)" in proc.stdout and '"eval.baseline": "gt"' in proc.stdout
    assert "jobs/lm_listener_on_listener.yaml" in proc.stdout
