"""Spec loading and validation: every problem at once, with key paths; every shipped YAML loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from facelab.spec.loading import SpecError, load_job, load_sweep, parse_set, plan_trials

REPO = Path(__file__).resolve().parents[1]


def write(tmp: Path, name: str, data) -> Path:
    p = tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    write(tmp_path, "jobs/j.yaml", {"kind": "cteg", "name": "j", "train": {"epochs": 2}})
    return tmp_path


def sweep(proj: Path, **kw) -> Path:
    base = {"name": "s", "job": "jobs/j.yaml", "metric": {"name": "val/loss", "goal": "minimize"}}
    base.update(kw)
    return write(proj, "sweeps/s.yaml", base)


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_loads(path):
    from facelab.families import registry

    job, d = load_job(path)
    assert isinstance(job, registry.get(d["kind"]).job)
    # every key is written out in the shipped YAML (the jobs double as documentation)
    raw = yaml.safe_load(path.read_text())
    for section, fields in d.items():
        if isinstance(fields, dict):
            assert set(fields) <= set(raw.get(section) or {}), (
                f"{path.name}: {section} lacks {set(fields) - set(raw[section])}"
            )


def test_keyframe_jobs_and_metric_check(proj):
    from facelab.families.keyframe_lm.job import KeyframeJob
    from facelab.spec.loading import SpecError

    job, d = load_job(REPO / "jobs" / "keyframe.yaml", ["prompt.format=non_semantic", "data.annotation=image"])
    assert isinstance(job, KeyframeJob) and d["prompt"]["format"] == "non_semantic"
    with pytest.raises(SpecError, match="data.annotation"):
        load_job(REPO / "jobs" / "keyframe.yaml", ["data.annotation=photo"])
    with pytest.raises(SpecError, match="not reported by the keyframe job"):
        load_sweep(REPO / "sweeps" / "keyframe_quickstart.yaml", ["metric.name=val/cppl"], root=REPO)
    grid = load_sweep(REPO / "sweeps" / "keyframe_lora.yaml", root=REPO)
    assert len(grid.trials) == 2 * 3 * 2 * 3  # Base/Tuned x annotation x format x base model


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_loads_and_plans(path):
    loaded = load_sweep(path, root=REPO)
    assert loaded.trials, "a shipped sweep must plan at least one trial"


def test_quickstart_plans_two_trials():
    loaded = load_sweep(REPO / "sweeps" / "quickstart.yaml", root=REPO)
    assert [t.variant for t in loaded.trials] == ["CTEG", "w.o. EwA"]
    assert loaded.trials[1].overrides(loaded.spec.variants) == {"model.ewa": False, "train.seed": 0}


def test_grid_crosses_variants_parameters_and_seeds(proj):
    p = sweep(
        proj,
        variants={"a": {}, "b": {"model.ewa": False}},
        seeds=[0, 1],
        parameters={"optim.lr_mul": {"values": [1.0, 2.0, 4.0]}},
    )
    trials = load_sweep(p, root=proj).trials
    assert len(trials) == 2 * 2 * 3
    assert {(t.variant, t.seed, t.params["optim.lr_mul"]) for t in trials} == {
        (v, s, lr) for v in "ab" for s in (0, 1) for lr in (1.0, 2.0, 4.0)
    }


def test_all_problems_reported_at_once_with_key_paths(proj):
    p = sweep(
        proj,
        method="grid",
        bogus=1,
        seeds=[],
        variants={"bad": {"model.nope": 1, "model.d_model": "wide"}},
        parameters={"optim.lr_mul": {"values": []}, "model.lta": {"distribution": "uniform", "min": 0, "max": 1}},
        resources={"num_workers": 0},
    )
    with pytest.raises(SpecError) as ei:
        load_sweep(p, root=proj)
    msg = str(ei.value)
    for needle in [
        "bogus: unknown key",
        "seeds: empty",
        "variants.bad.model.nope: not a key",
        "variants.bad.model.d_model",
        "optim.lr_mul: 'values' is empty",
        "resources.num_workers",
        "parameters.model.lta: method 'grid' needs",
    ]:
        assert needle in msg, f"missing {needle!r} in:\n{msg}"
    assert len(ei.value.problems) >= 7


def test_missing_job_file_is_named(proj):
    with pytest.raises(SpecError, match=r"job: job file 'jobs/nope.yaml' does not exist"):
        load_sweep(sweep(proj, job="jobs/nope.yaml"), root=proj)


def test_yaml_syntax_error_names_the_line(proj):
    p = write(proj, "sweeps/bad.yaml", "name: s\njob: jobs/j.yaml\nmetric: {name: val/loss\n  goal: [\n")
    with pytest.raises(SpecError, match=r"line \d+, column \d+"):
        load_sweep(p, root=proj)


def test_unknown_metric_and_wrong_types(proj):
    p = sweep(proj, metric={"name": "val/accuracy", "goal": "up"}, max_concurrent_trials="many")
    with pytest.raises(SpecError) as ei:
        load_sweep(p, root=proj)
    msg = str(ei.value)
    assert "metric.goal" in msg and "max_concurrent_trials" in msg and "metric.name: 'val/accuracy'" in msg


def test_set_overrides_sweep_and_job_keys(proj):
    loaded = load_sweep(
        sweep(proj), ["seeds=[3, 4]", "train.epochs=7", "resources.num_workers=2", "job.name=renamed"], root=proj
    )
    assert loaded.spec.seeds == [3, 4]
    assert loaded.spec.resources.num_workers == 2
    assert loaded.job.train.epochs == 7 and loaded.job.name == "renamed"


def test_set_unknown_key_and_bad_value(proj):
    with pytest.raises(SpecError) as ei:
        load_sweep(sweep(proj), ["train.epoch=3", "model.d_model=abc"], root=proj)
    assert "--set train.epoch" in str(ei.value) and "model.d_model" in str(ei.value)


def test_parameter_values_are_type_checked(proj):
    p = sweep(proj, parameters={"optim.lr_mul": {"values": [1.0, -2.0]}})
    with pytest.raises(SpecError, match=r"parameters.optim.lr_mul\[1\] = -2.0: Input should be greater than 0"):
        load_sweep(p, root=proj)


def test_cross_field_rule_in_a_variant(proj):
    p = sweep(proj, variants={"odd": {"model.d_model": 100, "model.n_heads": 12}})
    with pytest.raises(SpecError, match="variants.odd.model: d_model .100. must be divisible by n_heads"):
        load_sweep(p, root=proj)


def test_random_and_optuna_accept_distributions(proj):
    for method in ("random", "optuna"):
        p = sweep(
            proj,
            method=method,
            num_samples=3,
            parameters={"optim.lr_mul": {"distribution": "log_uniform_values", "min": 0.1, "max": 10}},
        )
        loaded = load_sweep(p, root=proj)
        assert len(loaded.trials) == 3
        assert loaded.trials[0].params["optim.lr_mul"].startswith("<log_uniform_values")


def test_parse_set_rejects_malformed():
    with pytest.raises(SpecError):
        parse_set(["novalue", "=3"])
    assert parse_set(["a.b=[1, 2]", "c=true", "d=x"]) == [("a.b", [1, 2]), ("c", True), ("d", "x")]


def test_job_set_and_unknown_kind(tmp_path):
    p = write(tmp_path, "j.yaml", {"kind": "cteg", "model": {"d_model": 64, "n_heads": 4}})
    job, d = load_job(p, ["model.lta=pooling"])
    assert job.model.lta == "pooling" and d["model"]["d_model"] == 64
    with pytest.raises(SpecError, match="model.lta"):
        load_job(p, ["model.lta=sideways"])
    with pytest.raises(SpecError, match="unknown job kind"):
        load_job(write(tmp_path, "k.yaml", {"kind": "nope"}))
    assert plan_trials  # imported API stays public


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_passes_dry_run(path, capsys, monkeypatch):
    from facelab.cli import main

    monkeypatch.chdir(REPO)
    assert main(["sweep", str(path.relative_to(REPO)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    n = len(load_sweep(path, root=REPO).trials)
    assert f"{n} trial(s)" in out and out.count("overrides:") == n


def test_variant_with_its_own_job_file(proj):
    """A variant may name another family's job file (a learned baseline as one row of a table):
    its overrides, the sweep's parameters and the metric are checked against that job's schema."""
    write(proj, "jobs/lml.yaml", {"kind": "lm_listener", "name": "lml", "train": {"epochs": 3, "vq_epochs": 2}})
    p = sweep(
        proj,
        metric={"name": "val/cppl", "goal": "minimize"},
        variants={"CTEG": {}, "LM-Listener": {"job": "jobs/lml.yaml", "model.top_p": 0.9}},
    )
    loaded = load_sweep(p, ["train.epochs=1", "train.vq_epochs=1"], root=proj)
    assert loaded.spec.variants == {"CTEG": {}, "LM-Listener": {"model.top_p": 0.9}}  # "job" is not an override
    assert loaded.job_for("CTEG")["kind"] == "cteg" and loaded.job_for("CTEG")["train"]["epochs"] == 1
    lml = loaded.job_for("LM-Listener")
    assert lml["kind"] == "lm_listener" and lml["train"] == {**lml["train"], "epochs": 1, "vq_epochs": 1}
    assert [t.variant for t in loaded.trials] == ["CTEG", "LM-Listener"]

    bad = sweep(
        proj,
        metric={"name": "val/kl", "goal": "minimize"},
        variants={
            "CTEG": {},
            "A": {"job": "jobs/lml.yaml", "model.ewa": False},
            "B": {"job": "jobs/missing.yaml"},
            "C": {"job": 3},
            "D": {"job": "jobs/lml.yaml", "model.top_p": 2.0},
        },
    )
    with pytest.raises(SpecError) as ei:
        load_sweep(bad, ["model.nope=1"], root=proj)
    msg = str(ei.value)
    assert "variants.A.model.ewa: not a key of the LMListenerJob config" in msg
    assert "variants.B.job: job file 'jobs/missing.yaml' does not exist" in msg
    assert "variants.C.job: must be a job file path" in msg
    assert "variants.D.model.top_p" in msg
    assert "metric.name: 'val/kl' is not reported by the lm_listener job of variant 'A'" in msg
    assert "--set model.nope: not a sweep key nor a key of any job config" in msg


def test_error_summary_puts_the_innermost_cause_first():
    """A failed trial's ``facelab.error`` tag starts with what went wrong, not with Ray's wrapper."""
    from facelab.runtime.sweep import error_summary

    remote = (
        "ray::_RayTrainWorker__execute.get_next() (pid=1, ip=127.0.0.1)\n"
        '  File "x.py", line 3, in worker_loop\n    ckpt.load_resume(resume)\n'
        "facelab.core.checkpoint.CheckpointError: /ckpt/model.safetensors: truncated or not safetensors"
    )

    class WorkerGroupError(RuntimeError):
        pass

    try:
        try:
            raise RuntimeError(remote)
        except RuntimeError as inner:
            raise WorkerGroupError("Training failed due to worker errors:\n[Rank 0]\n" + remote) from inner
    except WorkerGroupError as err:
        text = error_summary(err)
    head, _, rest = text.partition("\n\n")
    assert head == "facelab.core.checkpoint.CheckpointError: /ckpt/model.safetensors: truncated or not safetensors"
    assert rest.startswith("WorkerGroupError: Training failed") and "[Rank 0]" in rest
    assert error_summary(ValueError("plain")) == "ValueError: plain"
    assert len(error_summary(ValueError("x" * 9000))) == 5000


def test_show_lists_reported_metrics_only(proj):
    """``show:`` prints metrics beside the sweep's own; each must be one the job reports, named by index."""
    ok = sweep(proj, metric={"name": "val/mse", "goal": "minimize"}, show=["val/cppl", "val/kl"])
    assert load_sweep(ok, root=proj).spec.show == ["val/cppl", "val/kl"]
    bad = sweep(proj, metric={"name": "val/mse", "goal": "minimize"}, show=["val/cppl", "val/cpl"])
    with pytest.raises(SpecError) as ei:
        load_sweep(bad, root=proj)
    assert "show[1]: 'val/cpl' is not reported by the cteg job" in str(ei.value)
    assert "show[0]" not in str(ei.value)
