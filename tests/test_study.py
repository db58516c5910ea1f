"""Blind ranking studies (facelab.study; CTEG §4.5, Figure 4): Fleiss' kappa against published and
independent computations, a study made from the trained quickstart sweep (blind, seeded), scripted raters
ranking through the served page in headless Chromium -- the report's kappa and preference distribution
equal the ones computed here from the planned rankings -- and hostile submissions refused with nothing
written."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import urllib.error
import urllib.request
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from facelab.study import core, stats

from conftest import clone_with_runs, facelab, free_port

# Wikipedia, "Fleiss' kappa", worked example: 10 subjects, 5 categories, 14 raters; kappa = 0.210.
WIKI_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def pairwise_kappa(rankings: dict, methods: list[str], items: list[str]) -> float:
    """Fleiss' kappa the other way round: P̄ is the share of agreeing rater *pairs* per subject (an
    (item, method) output), P̄_e the chance that two random assignments share a rank."""
    raters = sorted(rankings)
    agree, subjects = 0.0, 0
    assignments: dict[int, int] = {}
    for it in items:
        for m in methods:
            ranks = [rankings[r][it][m] for r in raters]
            pairs = list(combinations(ranks, 2))
            agree += sum(a == b for a, b in pairs) / len(pairs)
            subjects += 1
            for x in ranks:
                assignments[x] = assignments.get(x, 0) + 1
    p_bar = agree / subjects
    total = sum(assignments.values())
    p_e = sum((n / total) ** 2 for n in assignments.values())
    return (p_bar - p_e) / (1 - p_e)


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def test_fleiss_kappa_matches_the_worked_example_and_perfect_agreement():
    assert stats.fleiss_kappa(WIKI_TABLE) == pytest.approx(0.2099, abs=5e-4)  # Wikipedia: 0.210
    methods, items = ["a", "b", "c"], ["i0", "i1", "i2", "i3"]
    same = {"x": {"i0": {"a": 1, "b": 2, "c": 3}, "i1": {"a": 2, "b": 3, "c": 1},
                  "i2": {"a": 3, "b": 1, "c": 2}, "i3": {"a": 1, "b": 3, "c": 2}}}  # fmt: skip
    perfect = {r: same["x"] for r in ("x", "y", "z")}
    assert stats.fleiss_kappa(stats.rank_counts(perfect, methods, items)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = {r: {it: dict(zip(methods, (rng.permutation(3) + 1).tolist())) for it in items} for r in "pqrst"}
    got = stats.fleiss_kappa(stats.rank_counts(noisy, methods, items))
    assert got == pytest.approx(pairwise_kappa(noisy, methods, items), abs=1e-12)
    s = stats.summary(noisy, methods, items)
    assert np.allclose(np.sum(s["preference"], axis=1), 1.0)
    for m in methods:
        assert s["avg_rank"][m] == pytest.approx(np.mean([noisy[r][it][m] for r in noisy for it in items]))
    with pytest.raises(ValueError, match="same number of ratings"):
        stats.fleiss_kappa([[1, 1], [2, 1]])
    with pytest.raises(ValueError, match="at least 2 ratings"):
        stats.fleiss_kappa([[1, 0], [0, 1]])


# ------------------------------------------------------------------------------------------------
# A study of the trained quickstart sweep
# ------------------------------------------------------------------------------------------------

N_ITEMS = 4
METHODS = ["CTEG", "w.o. EwA"]
# Planned rankings: the rank each rater gives each method on each item (1 = most consistent).
PLAN = {
    "alice": {0: ("CTEG", "w.o. EwA"), 1: ("CTEG", "w.o. EwA"), 2: ("CTEG", "w.o. EwA"), 3: ("CTEG", "w.o. EwA")},
    "bob": {0: ("CTEG", "w.o. EwA"), 1: ("CTEG", "w.o. EwA"), 2: ("CTEG", "w.o. EwA"), 3: ("w.o. EwA", "CTEG")},
    "carol-3": {0: ("CTEG", "w.o. EwA"), 1: ("CTEG", "w.o. EwA"), 2: ("w.o. EwA", "CTEG"), 3: ("w.o. EwA", "CTEG")},
}
# Items 0 and 1: all three agree; items 2 and 3: one pair of three agrees. P̄ = 2/3, P̄_e = 1/2 → κ = 1/3.
PLANNED_KAPPA = 1 / 3


@pytest.fixture(scope="module")
def study_project(quickstart_runs, tmp_path_factory):
    """A copy of the quickstart project with a 4-item study made twice with the same seed."""
    src, _ = quickstart_runs
    p = clone_with_runs(src, tmp_path_factory.mktemp("study") / "p")
    facelab(p, "study", "create", "quickstart", "--items", str(N_ITEMS), "--seed", "3", "--out", "studyA")
    facelab(p, "study", "create", "quickstart", "--items", str(N_ITEMS), "--seed", "3", "--out", "studyB")
    return p


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def inproc_server():
    """``facelab.study.server`` on a free port in this process (for API-level checks)."""
    from facelab.study.server import serve

    started = []

    def start(study_dir: Path) -> str:
        server = serve(study_dir, port=free_port())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for s in started:
        s.shutdown()
        s.server_close()


def test_study_is_seeded_and_blind(study_project, inproc_server):
    a, b = study_project / "studyA", study_project / "studyB"
    sa, sb = json.loads((a / "study.json").read_text()), json.loads((b / "study.json").read_text())
    sa.pop("created"), sb.pop("created")
    assert sa == sb  # same seed: same methods, items and settings
    for it in sa["items"]:
        assert (a / "outputs" / f"{it['id']}.json").read_bytes() == (b / "outputs" / f"{it['id']}.json").read_bytes()
    assert [m["name"] for m in sa["methods"]] == METHODS
    assert len(sa["items"]) == N_ITEMS and len({it["index"] for it in sa["items"]}) == N_ITEMS
    from facelab.data.emoava import load_split

    test_texts = load_split(study_project / "data" / "emoava", "test").texts
    assert all(test_texts[it["index"]] == it["text"] for it in sa["items"])
    outs = core.outputs(a, sa["items"][0]["id"])
    for m in sa["methods"]:
        frames = np.asarray(outs[m["id"]]["frames"])
        assert frames.ndim == 2 and frames.shape[1] == 53 and 1 <= len(frames) <= 48  # the model's maximum

    # Each rater's order is a permutation; raters see different orders.
    orders = {r: [core.order(sa, r, it["id"]) for it in sa["items"]] for r in PLAN}
    assert all(sorted(o) == ["m0", "m1"] for os_ in orders.values() for o in os_)
    assert len({json.dumps(o) for o in orders.values()}) > 1
    assert orders == {r: [core.order(sa, r, it["id"]) for it in sa["items"]] for r in PLAN}  # reproducible

    # What a rater receives names no method: not the variant, its id, nor its run.
    url = inproc_server(a)
    # (ids as JSON strings: the page's inlined face.js has variables called m0 and m1)
    secrets = [*METHODS, "EwA", *(f'"{m["id"]}"' for m in sa["methods"]), *(m["run_id"] for m in sa["methods"])]
    bodies = [_get(f"{url}/?rater=alice")[1], _get(f"{url}/api/progress?rater=alice")[1]]
    for r in PLAN:
        for i in range(N_ITEMS):
            status, body = _get(f"{url}/api/item?rater={r}&i={i}")
            assert status == 200
            shown = json.loads(body)
            assert [o["label"] for o in shown["options"]] == ["A", "B"]
            want = [outs_["frames"] for outs_ in (core.outputs(a, sa["items"][i]["id"])[mid] for mid in orders[r][i])]
            assert [o["frames"] for o in shown["options"]] == want  # label A is the rater's first method
            bodies.append(body)
    for body in bodies:
        text = body.decode()
        assert not [s for s in secrets if s in text], "a method is named to the rater"


def _plan_by_method(study: dict) -> dict:
    items = [it["id"] for it in study["items"]]
    return {r: {items[i]: {m: k + 1 for k, m in enumerate(ranked)} for i, ranked in plan.items()}
            for r, plan in PLAN.items()}  # fmt: skip


def test_scripted_raters_in_chromium_give_the_planned_kappa(study_project, tmp_path):
    from test_viewer import _chromium

    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    study_dir = study_project / "studyA"
    study = core.load(study_dir)
    names = {m["id"]: m["name"] for m in study["methods"]}
    port = free_port()
    import subprocess
    import time

    from conftest import BIN, env_for

    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "facelab"), "study", "serve", "studyA", "--port", str(port)],
        cwd=study_project, env=env_for(study_project), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _get_ok(f"{url}/healthz") is False:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        requests: list[str] = []
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
            try:
                for rater, plan in PLAN.items():
                    page = browser.new_page()
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.on("request", lambda r: requests.append(r.url))
                    page.goto(f"{url}/?rater={rater}")
                    for i in range(N_ITEMS):
                        page.wait_for_selector(f"#study-root[data-ready='1'][data-item='{i}']", timeout=20_000)
                        assert page.locator(".option canvas.heatmap").count() == 2
                        assert f"Item {i + 1} of {N_ITEMS}" in page.inner_text("#progress")
                        assert page.inner_text("#item-text") == study["items"][i]["text"]
                        seen = core.order(study, rater, study["items"][i]["id"])
                        rank_of = {m: k + 1 for k, m in enumerate(plan[i])}
                        if rater == "alice" and i == 0:  # a duplicate rank is refused on the page
                            page.select_option("select[name='rank-A']", "1")
                            page.select_option("select[name='rank-B']", "1")
                            page.click("#submit")
                            page.wait_for_selector("#status.error", timeout=10_000)
                            assert "rank 1 is given twice" in page.inner_text("#status")
                        for label, mid in zip("AB", seen):
                            page.select_option(f"select[name='rank-{label}']", str(rank_of[names[mid]]))
                        page.click("#submit")
                    page.wait_for_selector("#done", timeout=20_000)
                    assert not errors, errors
                    page.close()
            finally:
                browser.close()
        assert all(u.startswith(url) for u in requests), [u for u in requests if not u.startswith(url)][:3]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

    # The responses are stored by method id, one file per rater.
    assert sorted(p.name for p in (study_dir / "responses").iterdir()) == [f"{r}.json" for r in sorted(PLAN)]
    planned = _plan_by_method(study)
    items = [it["id"] for it in study["items"]]
    want_kappa = pairwise_kappa(planned, METHODS, items)
    assert want_kappa == pytest.approx(PLANNED_KAPPA)
    votes = {m: [planned[r][it][m] for r in planned for it in items] for m in METHODS}
    want_pref = {m: [v.count(k) / len(v) for k in (1, 2)] for m, v in votes.items()}

    out = facelab(study_project, "study", "report", "studyA", "--log")
    assert f"Fleiss' κ = {want_kappa:.3f}" in out.stdout
    for m in METHODS:
        row = next(line for line in out.stdout.splitlines() if line.startswith(f"| {m} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:3] == [f"{100 * p:.1f}%" for p in want_pref[m]]
        assert cells[3].strip("*") == f"{np.mean(votes[m]):.2f}"
    assert f"{N_ITEMS} items, {len(PLAN)} raters" in out.stdout
    assert (study_dir / "preference.png").stat().st_size > 1000

    from facelab.core import tracking

    c = tracking.client(tracking.default_tracking_uri(study_project))  # the project's own store, as the CLI used
    run = c.get_run(study["parent_run_id"])
    assert run.data.metrics["study/kappa"] == pytest.approx(want_kappa, abs=1e-9)
    for m in METHODS:
        key = f"study/avg_rank/{m}"
        assert run.data.metrics[key] == pytest.approx(np.mean(votes[m]))
    assert {a.path for a in c.list_artifacts(run.info.run_id, "study")} >= {"study/report.md", "study/preference.png"}


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
        return False


def test_hostile_submissions_are_refused_and_nothing_is_written(study_project, inproc_server, tmp_path):
    study_dir = shutil.copytree(
        study_project / "studyA", tmp_path / "study", ignore=shutil.ignore_patterns("responses")
    )
    (study_dir / "responses").mkdir()
    url = inproc_server(study_dir)
    ok = {"rater": "dora", "item": 0, "ranks": {"A": 1, "B": 2}}
    cases = [
        ({**ok, "ranks": {"A": 1, "B": 1}}, "rank 1 is given twice"),
        ({**ok, "ranks": {"A": 1}}, "missing ['B']"),
        ({**ok, "ranks": {"A": 1, "B": 2, "C": 3}}, "unknown ['C']"),
        ({**ok, "ranks": {"A": 0, "B": 2}}, "ranks.A"),
        ({**ok, "ranks": {"A": True, "B": 2}}, "ranks.A"),
        ({**ok, "item": 99}, "item: 99 is not an item"),
        ({**ok, "item": "x"}, "item: 'x' is not an item number"),
        ({**ok, "rater": "../../etc/passwd"}, "rater:"),
        ({**ok, "rater": "a/b"}, "rater:"),
        ({**ok, "rater": ".hidden"}, "rater:"),
        ({**ok, "rater": ""}, "rater:"),
        ({"rater": "dora", "item": 0}, "ranks: missing"),
    ]
    for body, msg in cases:
        status, answer = _post(f"{url}/api/rank", json.dumps(body).encode())
        assert status == 400 and msg in answer["error"], (body, status, answer)
    status, answer = _post(f"{url}/api/rank", b"{not json")
    assert status == 400 and "body: not JSON" in answer["error"]
    for bad in ("..%2F..%2Fstudy", "a%2Fb", ""):
        status, body = _get(f"{url}/api/item?rater={bad}&i=0")
        assert status == 400 and b"rater" in body
    assert _get(f"{url}/media/..%2Fstudy.json")[0] == 404
    assert list((study_dir / "responses").iterdir()) == []
    assert not list(study_dir.parent.glob("*.json")) and not list(tmp_path.glob("etc*"))
    # and a good one is kept
    status, answer = _post(f"{url}/api/rank", json.dumps(ok).encode())
    assert status == 200 and answer == {"ok": True, "done": 1, "n_items": N_ITEMS}
    assert [p.name for p in (study_dir / "responses").iterdir()] == ["dora.json"]
    # a rater who has not ranked every item is left out of the statistics, and said so
    from facelab.study.report import report

    text, summary = report(study_dir)
    assert summary["raters"] == 0 and f"dora (1/{N_ITEMS})" in text and "Fleiss' κ = – (needs 2 raters)" in text


def test_create_refuses_bad_arguments(study_project):
    bad = facelab(study_project, "study", "create", "quickstart", "--variants", "CTEG,Nope", "--out", "s2", check=False)
    assert bad.returncode == 2 and "--variants: ['Nope'] not in this sweep's variants" in bad.stderr
    again = facelab(study_project, "study", "create", "quickstart", "--items", "2", "--out", "studyA", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert not (study_project / "s2").exists() and json.loads((study_project / "studyA" / "study.json").read_text())


# ------------------------------------------------------------------------------------------------
# Keyframe outputs: the page draws schematic faces (synthetic outputs; no keyframe sweep needed)
# ------------------------------------------------------------------------------------------------


def test_keyframe_study_page_draws_faces(tmp_path, inproc_server):
    from facelab.data.arkit import HIGH, LOW
    from test_viewer import _chromium

    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    rng = np.random.default_rng(1)
    methods = [{"id": f"m{k}", "name": n, "variant": n, "run_id": f"r{k}", "seed": 0}
               for k, n in enumerate(["LoRA-Tuned", "Base", "MDM"])]  # fmt: skip
    items = [{"id": f"i{k:03d}", "index": k, "text": f"A quiet room. furious {k}", "background": "A quiet room.",
              "emotion": "furious", "descriptions": ["narrows the eyes", "bares the teeth"]} for k in range(2)]  # fmt: skip
    study = {"version": 1, "title": "kf", "sweep": "kf", "parent_run_id": "x", "task": "keyframes", "seed": 0,
             "max_frames": 128, "fps": 24, "methods": methods, "items": items}  # fmt: skip
    core.write_json_atomic(tmp_path / "study.json", study)
    lo, hi = np.asarray(LOW), np.asarray(HIGH)
    for it in items:
        core.write_json_atomic(
            tmp_path / "outputs" / f"{it['id']}.json",
            {m["id"]: {"keyframes": (lo + (hi - lo) * rng.random((2, len(lo)))).round(3).tolist()} for m in methods},
        )
    url = inproc_server(tmp_path)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/?rater=kf1")
            page.wait_for_selector("#study-root[data-ready='1'][data-item='0']", timeout=20_000)
            assert page.locator(".option .face-box svg").count() == 3
            assert page.locator("ol.descriptions li").count() == 2
            assert page.locator("select[name='rank-C'] option").count() == 4  # "–" and 1..3
            seen = core.order(study, "kf1", "i000")
            for label, mid in zip("ABC", seen):
                page.select_option(f"select[name='rank-{label}']", str(int(mid[1:]) + 1))
            page.click("#submit")
            page.wait_for_selector("#study-root[data-ready='1'][data-item='1']", timeout=20_000)
            assert not errors, errors
        finally:
            browser.close()
    assert core.responses_of(tmp_path, "kf1") == {"i000": {"m0": 1, "m1": 2, "m2": 3}}
