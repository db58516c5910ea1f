"""The team workflow around a sweep: W&B spellings, "did you mean", the --dry-run plan, report rows
per searched setting (± over seeds only)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from facelab import cli
from facelab.core.tracking import TrialRun
from facelab.report import aggregate, render, searched_keys
from facelab.spec.loading import SpecError, load_sweep

from conftest import BIN, REPO, facelab


def _trial(variant, seed, lr, cppl, status="FINISHED"):
    params = {"override.train.seed": str(seed), "override.optim.lr_mul": str(lr), "optim.lr_mul": str(lr)}
    return TrialRun(f"r{variant}{seed}{lr}", variant, seed, status, {"val/cppl": cppl}, params, {}, "")


def test_report_has_one_row_per_searched_setting_and_se_over_seeds_only():
    trials = [
        _trial("CTEG", s, lr, c)
        for lr, cs in ((0.1, (90, 92)), (1.0, (20, 22)), (10.0, (400, 404)))
        for s, c in zip((0, 1), cs)
    ]
    assert searched_keys(trials) == ["optim.lr_mul"]
    rows = aggregate(trials, ["val/cppl"])
    assert [r["variant"] for r in rows] == [
        "CTEG (optim.lr_mul=0.1)",
        "CTEG (optim.lr_mul=1.0)",
        "CTEG (optim.lr_mul=10.0)",
    ]
    assert [r["val/cppl"][0] for r in rows] == [91, 21, 402]
    assert rows[1]["val/cppl"][1] == pytest.approx(1.0)  # SE over the two seeds: std 1.414 / sqrt(2)
    assert "**21.000 ± 1.000**" in render(rows, ["val/cppl"])  # the best setting is visible and bold
    table = render(rows, ["val/cppl"]).splitlines()  # one Markdown cell per column on every row
    assert {line.count(" | ") for line in table if not line.startswith("|---")} == {table[0].count(" | ")}
    piped = render([{**rows[0], "variant": "a | b"}], ["val/cppl"]).splitlines()[-1]
    assert piped.startswith("| a \\| b | ") and piped.count(" | ") == table[0].count(" | ")
    merged = aggregate(trials, ["val/cppl"], by=["variant"])  # the old view, on request
    assert len(merged) == 1 and merged[0]["n"] == 6
    by_lr = aggregate(trials, ["val/cppl"], by=["optim.lr_mul"])
    assert [r["variant"] for r in by_lr] == ["optim.lr_mul=0.1", "optim.lr_mul=1.0", "optim.lr_mul=10.0"]


def _sweep(tmp_path, **kw):
    base = {"name": "s", "job": "jobs/cteg_tiny.yaml", "metric": {"name": "val/cppl"}, "variants": {"a": {}}}
    base.update(kw)
    (tmp_path / "jobs").mkdir(exist_ok=True)
    (tmp_path / "jobs" / "cteg_tiny.yaml").write_text((REPO / "jobs" / "cteg_tiny.yaml").read_text())
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(base))
    return tmp_path / "s.yaml"


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"method": "bayes"}, "use method 'optuna'"),
        ({"early_terminate": {"type": "hyperband"}}, "use type 'asha'"),
        (
            {"method": "random", "parameters": {"optim.lr_mul": {"distribution": "log_uniform", "min": -3, "max": 0}}},
            "takes natural-log exponents",
        ),
        (
            {"method": "random", "parameters": {"optim.lr_mul": {"distribution": "q_uniform", "min": 1, "max": 2}}},
            "quantised distributions are not supported",
        ),
        ({"resourcs": {"num_workers": 1}}, "resourcs: unknown key (did you mean 'resources'?)"),
        ({"variants": {"a": {"model.d_modle": 16}}}, "did you mean 'model.d_model'?"),
    ],
)
def test_wandb_spellings_and_typos_get_the_mapping(tmp_path, kw, expected):
    with pytest.raises(SpecError) as err:
        load_sweep(_sweep(tmp_path, **kw), root=tmp_path)
    assert expected in str(err.value)


def test_log_uniform_values_means_what_wandb_means(tmp_path):
    loaded = load_sweep(
        _sweep(
            tmp_path,
            method="random",
            parameters={"optim.lr_mul": {"distribution": "log_uniform_values", "min": 0.001, "max": 0.1}},
        ),
        root=tmp_path,
    )
    from facelab.runtime.sweep import param_space

    dom = param_space(loaded.spec)["params"]["optim.lr_mul"]
    assert (dom.lower, dom.upper) == (0.001, 0.1) and type(dom.sampler).__name__ == "_LogUniform"


def test_dry_run_shows_the_resolved_config_and_resources(tmp_path):
    out = facelab(REPO, "sweep", "sweeps/cteg_baselines_quickstart.yaml", "--dry-run", "--set", "train.epochs=3").stdout
    assert "resources per trial: 1 worker(s)" in out
    assert out.count("train.epochs: 2 -> 3") == 3  # --set is visible on every row, the LM-Listener one included
    assert "jobs/lm_listener_tiny.yaml (the variant's own job file, kind lm_listener)" in out
    full = facelab(REPO, "train", "jobs/cteg_tiny.yaml", "--print-config", "--set", "optim.lr_mul=3").stdout
    assert "resolved job config:" in full and "lr_mul: 3" in full


def test_one_trained_model_gives_its_msl64_and_shuffle_rows():
    """CTEG Table 2: "CTEG (MSL = 64)" and "Shuffle" are rows of the same trained model (no second
    training); the MSL-64 row has no Cppl ("–", as the paper's "/")."""
    from facelab.report import derived_rows

    six = ("cppl", "dot", "fgd", "diversity", "mmodality", "variation")
    metrics = {f"test/{m}": 1.0 for m in six} | {f"test64/{m}": 2.0 for m in six if m != "cppl"}
    metrics |= {f"shuffle/{m}": 3.0 for m in six} | {"test64/eval_time_s": 9.0}
    cteg = TrialRun("r1", "CTEG", 0, "FINISHED", metrics, {}, {}, "")
    gt = TrialRun("r2", "GT", 0, "FINISHED", {f"test/{m}": 0.5 for m in six}, {}, {}, "")
    rows = aggregate([cteg, gt, *derived_rows([cteg, gt])], [f"test/{m}" for m in six])
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"CTEG", "GT", "CTEG (MSL = 64)", "Shuffle"}
    assert "test/cppl" not in by["CTEG (MSL = 64)"] and by["CTEG (MSL = 64)"]["test/dot"][0] == 2.0
    assert by["Shuffle"]["test/cppl"][0] == 3.0
    table = render(rows, [f"test/{m}" for m in six])
    assert "| CTEG (MSL = 64) | – | 2.000" in table


# --------------------------------------------------------------------------------------------
# Shell completion and -q/-v, through a real bash
# --------------------------------------------------------------------------------------------


def _complete(script: str, words: list[str], cwd: Path) -> list[str]:
    """What bash offers after ``words`` (the last one is being typed), with the generated script."""
    import shlex

    line = " ".join(shlex.quote(w) for w in words)
    prog = f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _facelab; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    out = subprocess.run(["bash", "-c", prog], cwd=cwd, capture_output=True, text=True, check=True)
    return sorted(x for x in out.stdout.splitlines() if x)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completion_offers_commands_options_choices_and_files(tmp_path):
    script = subprocess.run(
        [str(BIN / "facelab"), "completion", "bash"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "mine.yaml").write_text("x: 1\n")
    assert _complete(script, ["facelab", "sw"], tmp_path) == ["sweep"]
    assert _complete(script, ["facelab", "data", "imp"], tmp_path) == [
        "import-emoava",
        "import-keyframeface",
        "import-lm-listener",
    ]
    assert "--dry-run" in _complete(script, ["facelab", "sweep", "--d"], tmp_path)
    assert _complete(script, ["facelab", "cp", ""], tmp_path) == ["family", "job", "sweep"]
    annotation = ["facelab", "data", "import-keyframeface", "a.jsonl", "--annotation", ""]
    assert _complete(script, annotation, tmp_path) == ["arkit", "image", "original"]
    # options given earlier do not hide the command path; positionals complete file names
    assert _complete(script, ["facelab", "--debug", "sweep", "sweeps/m"], tmp_path) == ["sweeps/mine.yaml"]
    zsh = subprocess.run([str(BIN / "facelab"), "completion", "zsh"], capture_output=True, text=True, check=True)
    assert zsh.stdout.startswith("autoload -U +X bashcompinit") and "complete -o filenames -F _facelab" in zsh.stdout


def test_quiet_and_verbose_set_the_sweep_drivers_verbosity(monkeypatch):
    from facelab.runtime import sweep

    seen = {}
    monkeypatch.setattr(cli, "cmd_families", lambda args: seen.setdefault("v", os.environ.get("FACELAB_VERBOSITY")))
    monkeypatch.delenv("FACELAB_VERBOSITY", raising=False)
    cli.main(["-q", "families"])
    assert seen.pop("v") == "-1" and sweep.verbosity() == -1
    cli.main(["-vvv", "families"])  # capped at DEBUG
    assert seen.pop("v") == "2" and sweep.verbosity() == 2
    monkeypatch.setenv("FACELAB_VERBOSITY", "loud")
    assert sweep.verbosity() == 0  # a bad value is the default, not a crash
