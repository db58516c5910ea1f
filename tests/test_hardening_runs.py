"""Hardening of the run bookkeeping: concurrent promotions converge on the best candidate, an
interrupted sweep stays resumable when a later start dies early, variant names cannot reach paths."""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from facelab.core import tracking
from facelab.runtime.sweep import SWEEP_STATE, SweepError, mark_latest, new_sweep_dir, resume_dir
from facelab.spec.loading import SpecError, load_sweep

from conftest import REPO


def _trial(c, exp_id: str, value: float) -> tracking.TrialRun:
    run = c.create_run(exp_id, tags={tracking.TAG_JOB_KIND: "cteg"})
    c.log_text(run.info.run_id, "{}", "checkpoint/config.json")
    c.set_terminated(run.info.run_id)
    return tracking.TrialRun(run.info.run_id, "CTEG", 0, "FINISHED", {"val/cppl": value}, {}, {}, f"cppl {value}")


def test_concurrent_promotions_converge_on_the_best(tmp_path):
    c = tracking.client(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = c.create_experiment("race", artifact_location=str(tmp_path / "art"))
    tracking.promote(c, _trial(c, exp, 1.0), "m", "val/cppl", "minimize")
    both_checked = threading.Barrier(2)

    def make_source(trial):  # called after the better-than-champion check: both have passed it here
        both_checked.wait(timeout=30)
        if trial.run_id == bad.run_id:
            time.sleep(1.0)  # the worse one registers and sets the alias last (the losing order)
        return f"{c.get_run(trial.run_id).info.artifact_uri}/checkpoint"

    good, bad = _trial(c, exp, 0.5), _trial(c, exp, 0.9)
    errors = []

    def promote(t):
        try:
            tracking.promote(c, t, "m", "val/cppl", "minimize", make_source=make_source)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(t,)) for t in (good, bad)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not errors, errors
    champ = c.get_model_version_by_alias("m", tracking.CHAMPION)
    assert champ.run_id == good.run_id, "the worse candidate ended as champion"


def test_resume_skips_a_start_that_died_before_writing_its_state(tmp_path):
    first = new_sweep_dir(tmp_path, "s")
    (first / SWEEP_STATE).write_text("{}")
    mark_latest(first)
    assert resume_dir(tmp_path, "s") == first
    second = new_sweep_dir(tmp_path, "s")  # a second start dies before its state file: LATEST unmoved
    assert second != first and (tmp_path / "s" / "LATEST").read_text() == first.name
    assert resume_dir(tmp_path, "s") == first
    (tmp_path / "s" / "LATEST").write_text(second.name)  # even a LATEST left by older code is survived
    assert resume_dir(tmp_path, "s", log=lambda *_: None) == first
    with pytest.raises(SweepError, match="nothing to resume"):
        resume_dir(tmp_path, "other")


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "x\\\\y", " lead", ""])
def test_variant_names_that_could_reach_a_path_are_refused(tmp_path, name):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "j.yaml").write_text((REPO / "jobs" / "cteg_tiny.yaml").read_text())
    sweep = {"name": "s", "job": "jobs/j.yaml", "metric": {"name": "val/cppl"}, "variants": {name: {}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(SpecError, match="variant name"):
        load_sweep(tmp_path / "s.yaml", root=tmp_path)


def test_paper_style_variant_names_are_fine(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "j.yaml").write_text((REPO / "jobs" / "cteg_tiny.yaml").read_text())
    names = ["CTEG", "w.o. EwA", "CTEG (MSL = 64)", "LM-Listener", "w. BERT fine-tuning", "nearest (top-3)"]
    sweep = {"name": "s", "job": "jobs/j.yaml", "metric": {"name": "val/cppl"}, "variants": {n: {} for n in names}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    assert list(load_sweep(tmp_path / "s.yaml", root=tmp_path).spec.variants) == names
