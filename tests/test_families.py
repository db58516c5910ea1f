"""The family contract and registry, the worker runtime's hooks, and the rule that the platform
never names a family (dispatch goes through the registry)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from facelab.core.config import Strict, Train
from facelab.families import registry
from facelab.families.base import Family, FamilyError
from facelab.runtime import worker

from conftest import REPO

BUILTIN = {"cteg", "lm_listener", "keyframe", "keyframe_mdm", "keyframe_evaluator"}


def test_registry_lists_the_builtin_families_with_their_tasks():
    fams = registry.families()
    assert BUILTIN <= set(fams)
    assert {k: fams[k].task for k in BUILTIN} == {
        "cteg": "expressions",
        "lm_listener": "expressions",
        "keyframe": "keyframes",
        "keyframe_mdm": "keyframes",
        "keyframe_evaluator": None,
    }
    for kind in BUILTIN:  # the lazy references resolve to real callables
        fam = registry.get(kind)
        assert callable(fam.get_worker_loop()) and callable(fam.get_load_servable())
        assert fam.job.model_fields["kind"].default == kind


def test_unknown_kind_names_the_known_ones_and_a_close_match():
    with pytest.raises(FamilyError, match=r"unknown job kind 'ctge' \(did you mean 'cteg'\?\); known: \["):
        registry.get("ctge")


class _Job(Strict):
    kind: Literal["demo"] = "demo"
    name: str = Field("demo")
    data: dict = {}
    train: Train = Train()


def test_a_family_is_checked_when_declared():
    ok = dict(job=_Job, metrics=frozenset({"val/loss"}), worker_loop="m:f", load_servable="m:g")
    assert Family(kind="demo", **ok).task is None
    with pytest.raises(FamilyError, match="must declare kind"):
        Family(kind="other", **ok)
    with pytest.raises(FamilyError, match="task 'poses'"):
        Family(kind="demo", task="poses", **ok)
    with pytest.raises(FamilyError, match="metrics is empty"):
        Family(kind="demo", **{**ok, "metrics": frozenset()})
    with pytest.raises(FamilyError, match="cannot be imported"):
        Family(kind="demo", **{**ok, "worker_loop": "no_such_module_xyz:loop"}).get_worker_loop()


def test_a_checkpoint_of_an_unknown_kind_is_refused_by_name(tmp_path):
    from facelab.core.checkpoint import CONFIG_FILE, CheckpointError

    (tmp_path / CONFIG_FILE).write_text(json.dumps({"kind": "no_such_family"}))
    with pytest.raises(CheckpointError, match="unknown job kind 'no_such_family'"):
        registry.load_servable(tmp_path)


def test_job_yaml_needs_a_known_kind(tmp_path):
    from facelab.spec.loading import SpecError, load_job

    (tmp_path / "a.yaml").write_text("name: x\n")
    with pytest.raises(SpecError, match="kind: required key is missing"):
        load_job(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("kind: keyframes\n")
    with pytest.raises(SpecError, match="did you mean 'keyframe'"):
        load_job(tmp_path / "b.yaml")


FAMILY_NAMES = re.compile(
    r"""(["'])(cteg|keyframe|lm_listener|keyframe_mdm|keyframe_evaluator)\1|facelab\.families\."""
    r"""(cteg|keyframe_lm|lm_listener|keyframe_mdm|keyframe_evaluator)\b"""
)


def test_no_module_outside_families_names_a_family():
    """Dispatch goes through the registry: the platform holds no family's kind nor imports one."""
    pkg = REPO / "platform" / "facelab"
    offenders = []
    for f in pkg.rglob("*.py"):
        if f.relative_to(pkg).parts[0] in ("families", "data"):
            # data/ holds dataset formats: LM-Listener's *dataset* shares the family's name (its
            # builder, importer and DVC params section say "lm_listener"), which dispatches on nothing
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FAMILY_NAMES.search(code) and not code.lstrip().startswith((":", "``", "*")):
                offenders.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_phase_hooks_see_each_phase_with_its_counts(monkeypatch, tmp_path):
    seen = []
    remove = worker.add_hook("phase", lambda name, s, epoch, info: seen.append((name, epoch, dict(info), s)))
    try:
        rt = worker.EpochRuntime(config={"job": {}, "data_dir": str(tmp_path)})
        with rt.phase("train", 3) as counts:
            counts["sequences"] = 5
        with pytest.raises(RuntimeError), rt.phase("validate", 3):
            raise RuntimeError("boom")  # a failing phase still reports its time
    finally:
        remove()
    assert [(n, e, i) for n, e, i, _ in seen] == [("train", 3, {"sequences": 5}), ("validate", 3, {})]
    assert all(s >= 0 for *_, s in seen)
    with rt.phase("test", 4):
        pass
    assert len(seen) == 2  # removed: not called any more
    with pytest.raises(ValueError, match="unknown event"):
        worker.add_hook("epoch", print)


def test_worker_hooks_from_the_environment(monkeypatch):
    import types

    calls = []
    mod = types.ModuleType("facelab_test_hooks")
    mod.install = calls.append
    monkeypatch.setitem(__import__("sys").modules, "facelab_test_hooks", mod)
    rt = worker.EpochRuntime(config={})
    monkeypatch.setenv("FACELAB_WORKER_HOOKS", "facelab_test_hooks:install, facelab_test_hooks:install")
    worker.install_env_hooks(rt)
    assert calls == [rt, rt]
    monkeypatch.setenv("FACELAB_WORKER_HOOKS", "facelab_test_hooks")
    with pytest.raises(ValueError, match="not 'module:function'"):
        worker.install_env_hooks(rt)


def test_non_finite_metrics_are_named():
    worker.check_finite({"val/loss": 1.0, "epoch": 2}, 2)
    with pytest.raises(worker.NonFiniteMetrics, match=r"epoch 2: \{'val/cppl': nan\}"):
        worker.check_finite({"val/loss": 1.0, "val/cppl": float("nan")}, 2)


def test_examples_family_declares_its_entry_point():
    text = (REPO / "examples" / "facelab-nearest" / "pyproject.toml").read_text()
    assert '[project.entry-points."facelab.families"]' in text and 'nearest = "facelab_nearest:FAMILY"' in text
    assert Path(REPO / "examples" / "facelab-nearest" / "facelab_nearest" / "__init__.py").is_file()


@pytest.mark.parametrize(
    "family, config",
    [
        ("cteg", "facelab.families.cteg.model:CTEGConfig"),
        ("lm_listener", "facelab.families.lm_listener.model:LMListenerConfig"),
        ("keyframe_mdm", "facelab.families.keyframe_mdm.model:MDMConfig"),
        ("keyframe_evaluator", "facelab.families.keyframe_evaluator.model:EvaluatorConfig"),
    ],
)
def test_a_models_config_is_its_job_schema(family, config):
    """One declaration of the hyperparameters: the class the model reads *is* the job schema's model
    section (or a subclass adding derived fields such as the MSL), so an unknown key is an error."""
    from facelab.families.base import resolve

    cls = resolve(config)
    section = registry.get(family).job.model_fields["model"].annotation
    assert issubclass(cls, section)
    with pytest.raises(ValueError, match="no_such_key"):
        cls(no_such_key=1)


def test_cteg_config_is_the_job_schema():
    from facelab.families.cteg.job import CTEGConfig, CTEGModel
    from facelab.families.cteg.servable import cteg_config

    assert issubclass(CTEGConfig, CTEGModel)  # one declaration: the model reads the job's own class
    job = registry.get("cteg").job().model_dump()
    assert cteg_config(job).max_frames == job["data"]["max_frames"]
    with pytest.raises(ValueError, match="no_such_key"):
        cteg_config({**job, "model": {**job["model"], "no_such_key": 1}})


def test_node_record_keeps_every_attempts_nodes():
    """A worker group restarted elsewhere (its node was lost) adds to the run's node record: every
    node of every attempt in ``facelab.nodes``, one ``facelab.node_history`` entry per attempt."""
    import json

    first = [{"node_id": "w", "ip": "10.0.0.2", "hostname": "gpu-1"}]
    t1 = worker.node_record({}, first, 0, 0.0)
    assert t1[worker.NODES_TAG] == "w" and json.loads(t1[worker.WORKER_NODES_TAG]) == ["w"]
    second = [
        {"node_id": "h", "ip": "10.0.0.1", "hostname": "head"},
        {"node_id": "w", "ip": "10.0.0.2", "hostname": "gpu-1"},
        {"node_id": "h", "ip": "10.0.0.1", "hostname": "head"},
    ]
    t2 = worker.node_record({**t1, "other": "x"}, second, 3, 60.0)
    assert t2[worker.NODES_TAG] == "w,h"  # first use first
    assert json.loads(t2[worker.WORKER_NODES_TAG]) == ["h", "w", "h"]  # this attempt, by rank
    history = json.loads(t2[worker.NODE_HISTORY_TAG])
    assert [(h["attempt"], h["start_epoch"]) for h in history] == [(0, 0), (1, 3)]
    assert history[1]["started"] == "1970-01-01T00:01:00Z"
    assert history[1]["nodes"] == {
        "h": {"ip": "10.0.0.1", "hostname": "head", "ranks": [0, 2]},
        "w": {"ip": "10.0.0.2", "hostname": "gpu-1", "ranks": [1]},
    }
    # Many restarts of a wide group: the history keeps MLflow's tag limit by dropping its oldest entries.
    wide = [{"node_id": f"{i:056x}", "ip": f"10.0.{i}.1", "hostname": f"node-{i}"} for i in range(16)]
    tags: dict[str, str] = {}
    for attempt in range(12):
        tags = worker.node_record(tags, wide, attempt, 0.0)
    assert all(len(v) <= worker.MAX_TAG_CHARS for v in tags.values())
    kept = json.loads(tags[worker.NODE_HISTORY_TAG])
    assert kept[-1]["attempt"] == 11 and 1 <= len(kept) < 12
    assert tags[worker.NODES_TAG].split(",") == [h["node_id"] for h in wide]
